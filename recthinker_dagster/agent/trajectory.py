"""The record of one agent episode: conversation, tool use, final ranking, metrics and costs.

``Trajectory.to_dict()`` is plain JSON (one line per trajectory in a ``.jsonl`` file) and
``Trajectory.from_dict`` reads it back. ``messages`` is the OpenAI-style conversation with
``tool_calls`` on assistant messages (arguments as objects, as TRL and the Qwen2.5 template
expect) and ``tools`` the schemas it was run with, so a trajectory renders on its own:
``tokenizer.apply_chat_template(t.messages, tools=t.tools)``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

from recthinker_dagster.agent.transcript import TokenTranscript

# Why a trajectory's final ranking is not a clean model answer (``Trajectory.reasons``).
REASON_NO_ANSWER = "no_answer"  # no usable answer even when asked, and no label head: fallback order
REASON_EMPTY_ANSWER = "empty_answer"  # an answer without a single valid label (the model is asked once more)
REASON_FORCED_HEAD = "forced_head"  # no usable answer even when asked: the label head ranked
REASON_PARTIAL = "partial_answer"  # missing candidates appended in candidate order
REASON_DUPLICATES = "duplicate_labels"
REASON_HALLUCINATED = "unknown_labels"
REASON_UNCLOSED = "unclosed_answer"
REASON_BACKEND_ERROR = "backend_error"


@dataclass
class AgentTask:
    """One ranking task: everything the agent loop and the tools need (a row of the task
    table plus the prompt's rendered history lines). ``tools.Toolbox`` takes it as is."""

    task_id: str
    user_id: str
    target_item_id: str
    candidate_item_ids: list[str]
    history_lines: list[str] = field(default_factory=list)
    history_item_ids: list[str] = field(default_factory=list)  # chronological, oldest first; never the target
    group: str = ""
    split: str = ""
    dataset: str = ""

    @classmethod
    def from_mapping(cls, row: Mapping, history_lines: Sequence[str] | None = None) -> AgentTask:
        """From a task-table row (extra keys ignored); ``history_lines`` overrides the row's."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["candidate_item_ids"] = [str(i) for i in values.get("candidate_item_ids", [])]
        values["history_item_ids"] = [str(i) for i in values.get("history_item_ids", [])]
        values["history_lines"] = list(history_lines if history_lines is not None else values.get("history_lines", []))
        for key in ("task_id", "user_id", "target_item_id"):
            values[key] = str(values[key])
        return cls(**values)

    def reordered(self, key: str) -> AgentTask:
        """This task with its candidates in an order drawn from ``key`` (a string seed), so
        the target's label changes: a policy that learned labels, or favours candidate positions,
        ranks the same items differently. The same key always gives the same order."""
        order = list(self.candidate_item_ids)
        random.Random(key).shuffle(order)
        return replace(self, candidate_item_ids=order)


@dataclass
class ToolCallRecord:
    turn: int  # 1-based assistant turn that made the call
    name: str | None
    arguments: dict | None
    ok: bool
    output_chars: int
    error_kind: str | None = None


def count_repeated_calls(records: Sequence[ToolCallRecord]) -> int:
    """Calls whose tool and arguments an earlier call in ``records`` already used."""
    seen, repeats = set(), 0
    for record in records:
        key = (record.name, json.dumps(record.arguments, sort_keys=True, ensure_ascii=False))
        repeats += key in seen
        seen.add(key)
    return repeats


@dataclass
class Trajectory:
    task_id: str
    user_id: str
    group: str
    split: str
    dataset: str
    producer: str  # model or teacher that wrote the assistant turns
    messages: list[dict]
    tools: list[dict]
    tool_calls: list[ToolCallRecord]
    target_item_id: str
    final_ranking: list[str]  # item ids, best first: always a permutation of the candidates
    final_labels: list[str]  # the same ranking as candidate labels
    valid: bool  # a full permutation from the model: a complete answer, or the forced head's ranking
    reasons: list[str]  # why not valid, or what was repaired or forced (empty when clean)
    finish: str  # "answer", "forced_answer" (after the final request), "forced_head" (the label head
    # ranked after the final request went unanswered) or "fallback" (candidate order; never valid)
    metrics: dict[str, float]
    n_turns: int  # assistant turns generated, the forced final turn included
    n_tool_calls: int  # calls that consumed budget (invalid ones included)
    n_invalid_calls: int  # malformed, unknown or failed calls
    n_parse_issues: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # generation wall time of the batches this task was in, plus its tool time
    answer_mode: str = "generate"  # "generate" (the model wrote the ranking) or "logits" (the label head)
    repaired: bool = False  # an incomplete answer took the parser's documented repair (never valid)
    # label -> the head's log-probability at the answer's first position, in candidate order: the
    # answer when the head ranked (logits mode, forced head), else recorded beside the model's own
    head_scores: dict[str, float] | None = None
    # the exact tokens (local backends; for training), never written to files
    transcript: TokenTranscript | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(replace(self, transcript=None))
        del data["transcript"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> Trajectory:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["tool_calls"] = [ToolCallRecord(**call) for call in values.get("tool_calls", [])]
        return cls(**values)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls.from_dict(json.loads(line))
