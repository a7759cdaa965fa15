"""Teachers: whatever writes the trajectories the policy is trained on.

    teacher = ScriptedTeacher(AgentConfig())               # offline, CPU, really calls the tools
    teacher = LLMTeacher(OpenAICompatibleBackend(...), AgentConfig())   # any LLM backend
    trajectories = teacher.run(tasks, toolbox_factory, sample_index=0, seed=0)

Every teacher has a ``name`` (recorded as the trajectories' ``producer``) and
``run(tasks, toolbox_factory, config=None, *, sample_index=0, seed=0) -> list[Trajectory]``;
``generation.generate_trajectories`` writes their output, resumably.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers.llm import LLMTeacher
from recthinker_dagster.agent.teachers.scripted import PRODUCER, InvestigatorSettings, ScriptedTeacher
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory


@runtime_checkable
class Teacher(Protocol):
    name: str

    def run(self, tasks: Iterable[AgentTask | Mapping], toolbox_factory: Callable,
            config: AgentConfig | None = None, *, sample_index: int = 0, seed: int = 0) -> list[Trajectory]: ...


__all__ = ["PRODUCER", "InvestigatorSettings", "LLMTeacher", "ScriptedTeacher", "Teacher"]
