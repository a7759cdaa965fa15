"""The one interface every LLM backend implements.

    generations = backend.generate(conversations, tools, params)

``conversations`` is a batch of OpenAI-style message lists, ``tools`` one list of function
schemas per conversation (or None), and the result one ``Generation`` per conversation, in
order. Backends never raise for one bad request: they return a ``Generation`` with
``finish_reason="error"`` and ``error`` set, so one failure does not sink a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time of the request, or of the whole batch it was generated in
    finish_reason: str = "stop"  # "stop", "length" or "error"
    error: str | None = None


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        params: SamplingParams,
    ) -> list[Generation]: ...


def tools_for(tools: Sequence[list[dict] | None] | None, n: int) -> list[list[dict] | None]:
    """One tool list per conversation (``None`` everywhere when no tools were given)."""
    if tools is None:
        return [None] * n
    if len(tools) != n:
        raise ValueError(f"got {len(tools)} tool lists for {n} conversations")
    return list(tools)
