"""The RecThinker agent: prompts, the turn parser, the batched loop, trajectories, backends.

    from recthinker_dagster.agent import AgentConfig, run_agent
    from recthinker_dagster.agent.backends import TransformersBackend

    backend = TransformersBackend.from_pretrained("assets/base_model")
    trajectories = run_agent(tasks, backend, toolbox_factory, AgentConfig(max_turns=6))

Nothing here imports Dagster, MLflow or DVC.
"""

from recthinker_dagster.agent.backends.base import AnswerSpec, Backend, Generation, SamplingParams
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.parser import (
    Answer,
    Issue,
    ParsedTurn,
    ToolCall,
    parse_answer,
    parse_turn,
)
from recthinker_dagster.agent.trajectory import AgentTask, ToolCallRecord, Trajectory

__all__ = [
    "AgentConfig",
    "AgentTask",
    "Answer",
    "AnswerSpec",
    "Backend",
    "Generation",
    "Issue",
    "ParsedTurn",
    "SamplingParams",
    "ToolCall",
    "ToolCallRecord",
    "Trajectory",
    "parse_answer",
    "parse_turn",
    "run_agent",
]
