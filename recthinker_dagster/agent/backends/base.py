"""The one interface every LLM backend implements.

    generations = backend.generate(conversations, tools, params)

``conversations`` is a batch of OpenAI-style message lists, ``tools`` one list of function
schemas per conversation (or None), and the result one ``Generation`` per conversation, in
order. Backends never raise for one bad request: they return a ``Generation`` with
``finish_reason="error"`` and ``error`` set, so one failure does not sink a batch.

Optional capabilities, used by the loop when a backend has them (local models do, HTTP
servers do not):

- ``constrains_answers = True``: ``generate`` also takes ``answers=[AnswerSpec, ...]`` (one per
  conversation) and decodes every ``<answer>`` the model opens as a permutation of those
  labels (``answer_mode="generate"``), or ranks them with the label head
  (``answer_mode="logits"``) and writes that ranking out; ``Generation.head_scores`` holds the
  head's score per label at the answer's first position (in ``generate`` mode too, with
  single-token labels, although the model then writes its own order).
- ``tracks_tokens = True``: ``generate`` and ``rank_labels`` also take ``prompt_ids=`` (one
  token list per conversation, used instead of rendering the messages), each ``Generation``
  carries its prompt and sampled ids with their log-probs, and ``environment_ids`` renders
  what follows a sampled turn. The loop then keeps every conversation as exact tokens
  (``agent/transcript.py``).
- ``rank_labels(conversations, tools, labels)``: the label head alone. One forward pass over
  each conversation plus an assistant turn opened with ``<answer>``; returns every label's
  log-probability at that position (``{label: score}`` per conversation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

ANSWER_MODES = ("generate", "logits")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = 0
    # the answer's labels under the answer constraint are sampled at this temperature (None: at
    # ``temperature``): exploring the ranking without loosening the tool calls. Local backend only.
    answer_temperature: float | None = None

    @property
    def answer_scale(self) -> float:
        """What the answer constraint multiplies the allowed labels' scores by, so that the
        sampler's division by ``temperature`` leaves them at ``answer_temperature``."""
        if self.greedy or self.answer_temperature is None:
            return 1.0
        if self.answer_temperature <= 0:
            raise ValueError(f"answer_temperature must be > 0, got {self.answer_temperature}")
        return self.temperature / self.answer_temperature

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


@dataclass(frozen=True)
class AnswerSpec:
    """How a conversation's answer may be written: its candidate labels (candidate order) and
    who orders them: the model token by token (``generate``) or the label head (``logits``)."""

    labels: tuple[str, ...]
    mode: str = "generate"

    def __post_init__(self):
        if self.mode not in ANSWER_MODES:
            raise ValueError(f"answer mode must be one of {list(ANSWER_MODES)}, got {self.mode!r}")


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time of the request, or of the whole batch it was generated in
    finish_reason: str = "stop"  # "stop", "length" or "error"
    error: str | None = None
    head_scores: dict[str, float] | None = None  # label -> head score at the answer's first position
    # local backends (``tracks_tokens``): the exact prompt, the sampled ids (the stop token
    # included when the turn stopped) and the sampler's log-probability of each
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        params: SamplingParams,
    ) -> list[Generation]: ...


def constrains_answers(backend) -> bool:
    """Whether ``backend.generate`` takes ``answers=`` (constrained answers, the label head)."""
    return bool(getattr(backend, "constrains_answers", False))


def tracks_tokens(backend) -> bool:
    """Whether the backend takes ``prompt_ids=`` and returns sampled ids (exact transcripts)."""
    return bool(getattr(backend, "tracks_tokens", False))


def has_label_head(backend) -> bool:
    """Whether ``backend`` can rank labels from their logits (``rank_labels``)."""
    return callable(getattr(backend, "rank_labels", None))


def head_ranking(scores: dict[str, float], labels: Sequence[str]) -> list[str]:
    """``labels`` by head score, best first; ties keep candidate order."""
    order = {label: k for k, label in enumerate(labels)}
    return sorted(labels, key=lambda label: (-scores[label], order[label]))


def tools_for(tools: Sequence[list[dict] | None] | None, n: int) -> list[list[dict] | None]:
    """One tool list per conversation (``None`` everywhere when no tools were given)."""
    if tools is None:
        return [None] * n
    if len(tools) != n:
        raise ValueError(f"got {len(tools)} tool lists for {n} conversations")
    return list(tools)
