"""The LLM systems of the evaluation: the base model as a zero-shot ranker (no tools), the base
model with tools, trained policies (SFT, SFT+RL), and the think-before-recommend policies
(RecZero, RecOne: tool-free, ``agent/think.py``), all through the real agent loop.

    policies = {"zero_shot": Policy(base, []), "sft": Policy(base, [sft_adapter]), "sft@logits": ...}
    trajectories = run_llm_systems(policies, tasks, toolbox_factory, settings)

Each distinct model (base folder plus adapters) is loaded once and serves every system that
uses it (``sft`` and ``sft@logits``, the same policy in the other answer mode, share one); each
system's tasks run as one batch.

A system named in ``settings["served_models"]`` (``{system: model name}``) generates on the
OpenAI-compatible server at ``$OPENAI_BASE_URL`` instead (``vllm serve`` with the adapters as
LoRA modules; docs/deploy.md), with no local model loaded. Its answers take the HTTP backends'
documented repair, counted per task, since nothing constrains a server's decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.think import think_config, without_tools
from recthinker_dagster.progress import ProgressLog
from recthinker_dagster.settings import THINK_SYSTEMS, system_and_mode

ZERO_SHOT = "zero_shot"


@dataclass(frozen=True)
class Policy:
    base_model: Path
    adapters: tuple[Path, ...] = field(default_factory=tuple)


def agent_config_for(name: str, settings: dict) -> AgentConfig:
    """The agent budgets of system ``name``. Who orders the answer, the model's tokens or the
    label head (``logits``): the name's mode (``sft@logits``), else ``settings["answer_mode"]``
    (default ``generate``)."""
    system, mode = system_and_mode(name)
    sampling = SamplingParams(max_new_tokens=settings["max_new_tokens"])
    answer_mode = mode or settings.get("answer_mode", "generate")
    if system == ZERO_SHOT:
        return AgentConfig(max_turns=1, max_tool_calls=0, sampling=sampling, producer=name, answer_mode=answer_mode)
    if system in THINK_SYSTEMS:
        return think_config(sampling, producer=name, answer_mode=answer_mode)
    return AgentConfig(max_turns=settings["max_turns"], max_tool_calls=settings["max_tool_calls"], sampling=sampling,
                       producer=name, answer_mode=answer_mode)


def uses_tools(name: str) -> bool:
    return system_and_mode(name)[0] not in (ZERO_SHOT, *THINK_SYSTEMS)


CHUNK_BATCHES = 4  # tasks per progress line: this many backend batches


def run_llm_systems(policies: dict[str, Policy], tasks: Sequence, toolbox_factory: Callable, settings: dict, *,
                    batch_size: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, list]:
    """``{system: trajectories}`` for every system in ``policies``, in task order; ``batch_size``
    (default ``settings["batch_size"]``, else 8): conversations per batch, or concurrent requests."""
    batch_size = batch_size or settings.get("batch_size") or 8
    from recthinker_dagster.agent.backends.openai_backend import OpenAICompatibleBackend
    from recthinker_dagster.agent.backends.transformers_backend import (
        TransformersBackend,
    )
    from recthinker_dagster.models.loading import load_agent_model

    served = dict(settings.get("served_models") or {})
    by_model: dict[Policy, list[str]] = {}
    for system, policy in policies.items():
        if system not in served:
            by_model.setdefault(policy, []).append(system)
    results: dict[str, list] = {}

    def run(system: str, backend) -> None:
        factory = toolbox_factory if uses_tools(system) else without_tools(toolbox_factory)
        config = agent_config_for(system, settings)
        # in chunks of a few batches, so that progress (and its ETA) shows every few minutes
        chunk = CHUNK_BATCHES * batch_size
        report = ProgressLog(progress or (lambda line: None), f"LLM evaluation, {system}", len(tasks), every=0.0)
        results[system] = []
        for start in range(0, len(tasks), chunk):
            results[system] += run_agent(tasks[start : start + chunk], backend, factory, config)
            report(len(results[system]))

    for system, model_name in served.items():
        if system in policies:
            run(system, OpenAICompatibleBackend(model=model_name, name=system, concurrency=batch_size))
    for policy, systems in by_model.items():
        model, tokenizer = load_agent_model(policy.base_model, list(policy.adapters))
        backend = TransformersBackend(model, tokenizer, name="+".join(systems), batch_size=batch_size)
        for system in systems:
            run(system, backend)
        del model, backend
    return {system: results[system] for system in policies}
