"""The LLM teacher: the agent loop itself, run with a (large) model behind any backend.

    backend = OpenAICompatibleBackend(base_url="http://gpu-box:8000/v1", model="Qwen/QwQ-32B")
    teacher = LLMTeacher(backend, AgentConfig(max_turns=6, max_tool_calls=8))
    trajectories = teacher.run(tasks, toolbox_factory, sample_index=0)

The model gets the Analyze-Plan-Act system prompt (``AgentConfig.system_prompt``) and the
tool schemas, exactly as the trained policy will; the trajectories' producer is the
backend's model name (or ``config.producer``). Sample ``k`` of a task uses its own sampling
seed; when the config is greedy, samples ``k > 0`` use ``sample_temperature`` so that they
differ (``None`` keeps them greedy, hence identical).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from recthinker_dagster.agent.backends.base import Backend
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory


class LLMTeacher:
    def __init__(self, backend: Backend, config: AgentConfig | None = None, *,
                 sample_temperature: float | None = 0.7):
        self.backend = backend
        self.config = config or AgentConfig()
        self.sample_temperature = sample_temperature

    @property
    def name(self) -> str:
        backend_name: str = getattr(self.backend, "name", type(self.backend).__name__)
        return self.config.producer or backend_name

    def sampling_for(self, config: AgentConfig, sample_index: int, seed: int):
        """The sampling parameters of sample ``sample_index`` (sample 0, seed 0: unchanged)."""
        params = config.sampling
        if (sample_index, seed) != (0, 0) and params.seed is not None:
            params = params.with_seed(zlib.crc32(f"{params.seed}/{seed}/{sample_index}".encode()) % 2**31)
        if sample_index > 0 and params.greedy and self.sample_temperature:
            params = replace(params, temperature=self.sample_temperature)
        return params

    def run(self, tasks: Iterable[AgentTask | Mapping], toolbox_factory: Callable, config: AgentConfig | None = None,
            *, sample_index: int = 0, seed: int = 0) -> list[Trajectory]:
        config = config or self.config
        config = replace(config, producer=config.producer or self.name,
                         sampling=self.sampling_for(config, sample_index, seed))
        return run_agent(tasks, self.backend, toolbox_factory, config)
