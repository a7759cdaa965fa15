"""Keep the teacher trajectories worth imitating; record why every other one was dropped.

    result = filter_trajectories(trajectories, FilterConfig(top_k=3), tokenizer=tokenizer,
                                 eval_users=eval_user_ids, eval_targets={(user, item), ...})
    result.kept, result.dropped, result.counts

Rules, in the order they are checked (all are recorded, so a trajectory may fail several;
each can be switched off in ``FilterConfig``):

=================  =========================================================================
reason             dropped when
=================  =========================================================================
eval_leak          the task is from a forbidden split (``eval``), its user is an eval user, or
                   its (user, target) pair is an eval target: SFT must never see eval tasks
parse_issues       the loop recorded parse issues, or an assistant turn does not re-parse
                   cleanly with ``parser.parse_turn`` (every turn before the last must be
                   tool calls matching the recorded ones, the last one the answer)
missing_reasoning  an assistant turn lacks its "Analysis:" or "Plan:" part
invalid_answer     the final answer is not a complete, clean permutation (``valid`` is false)
                   or did not come as a free answer (``finish != "answer"``: forced, fallback)
low_rank           the target ranks below ``top_k`` and NDCG@10 is below ``min_ndcg10``
                   (passing either one is enough)
too_few_calls      fewer tool calls than ``min_tool_calls``
tool_budget        more tool calls than ``max_tool_calls``, or a call refused by the budget
failed_calls       a malformed, unknown or failed tool call
repeated_calls     the same tool called twice with the same arguments
too_long           the rendered conversation (tools included) exceeds ``max_tokens``: counted
                   with the tokenizer when one is given, else estimated as chars / chars_per_token
not_best_for_task  another survivor of the same task was preferred (see below)
=================  =========================================================================

One per task: among a task's survivors the kept one has the highest NDCG@10 (SFT imitates
the answer, so the best ranking wins), then the fewest tool calls (the efficiency that GRPO
rewards later), then the fewest tokens, then the earliest in the input (deterministic).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

from recthinker_dagster.agent import parser as P
from recthinker_dagster.agent.trajectory import Trajectory, count_repeated_calls
from recthinker_dagster.metrics import rank_below_absent

EVAL_LEAK = "eval_leak"
PARSE_ISSUES = "parse_issues"
MISSING_REASONING = "missing_reasoning"
INVALID_ANSWER = "invalid_answer"
LOW_RANK = "low_rank"
TOO_FEW_CALLS = "too_few_calls"
TOOL_BUDGET = "tool_budget"
FAILED_CALLS = "failed_calls"
REPEATED_CALLS = "repeated_calls"
TOO_LONG = "too_long"
NOT_BEST_FOR_TASK = "not_best_for_task"
REASONS = (EVAL_LEAK, PARSE_ISSUES, MISSING_REASONING, INVALID_ANSWER, LOW_RANK, TOO_FEW_CALLS,
           TOOL_BUDGET, FAILED_CALLS, REPEATED_CALLS, TOO_LONG, NOT_BEST_FOR_TASK)
BUDGET_EXHAUSTED = "budget_exhausted"  # the loop's error kind for calls refused by the budget


@dataclass(frozen=True)
class FilterConfig:
    """Every threshold of the filter; ``None`` (or False) switches a rule off."""

    require_clean_parse: bool = True
    require_reasoning: bool = True  # every assistant turn has "Analysis:" and "Plan:"
    require_valid_answer: bool = True
    top_k: int | None = 3  # keep if the target ranks in the top k ...
    min_ndcg10: float | None = None  # ... or NDCG@10 reaches this
    min_tool_calls: int = 0
    max_tool_calls: int | None = 8
    forbid_failed_calls: bool = True
    forbid_repeated_calls: bool = True
    max_tokens: int | None = 3072  # keep it <= the SFT recipe's max_length
    chars_per_token: float = 2.8  # the proxy without a tokenizer (SmolLM2 on agent conversations: ~2.9)
    forbidden_splits: tuple[str, ...] = ("eval",)
    one_per_task: bool = True

    @classmethod
    def from_dict(cls, values: Mapping | None) -> FilterConfig:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown filter settings: {sorted(unknown)}")
        if "forbidden_splits" in values:
            values["forbidden_splits"] = tuple(values["forbidden_splits"])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    """The verdict on one trajectory."""

    trajectory: Trajectory
    reasons: list[str]  # empty when kept
    tokens: int  # the length the too_long rule used (tokens, or the chars proxy)
    target_rank: int  # 1-based rank of the target in the final ranking

    @property
    def kept(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        """The first (primary) reason, None when kept."""
        return self.reasons[0] if self.reasons else None

    def record(self) -> dict:
        t = self.trajectory
        return {
            "task_id": t.task_id, "user_id": t.user_id, "target_item_id": t.target_item_id, "group": t.group, "split": t.split,
            "producer": t.producer, "kept": self.kept, "reasons": self.reasons, "tokens": self.tokens,
            "target_rank": self.target_rank, "ndcg@10": t.metrics.get("ndcg@10"), "n_tool_calls": t.n_tool_calls,
        }


@dataclass
class FilterResult:
    decisions: list[Decision]  # one per input trajectory, input order
    config: FilterConfig
    counts: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[Trajectory]:
        return [d.trajectory for d in self.decisions if d.kept]

    @property
    def dropped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.kept]

    def records(self) -> list[dict]:
        """One plain row per trajectory (for a decisions table next to the kept set)."""
        return [d.record() for d in self.decisions]


def filter_trajectories(
    trajectories: Iterable[Trajectory | Mapping],
    config: FilterConfig | None = None,
    *,
    tokenizer=None,
    eval_users: Collection[str] = frozenset(),
    eval_targets: Collection[tuple[str, str]] = frozenset(),
) -> FilterResult:
    """Judge every trajectory (objects or ``to_dict`` mappings); see the module docstring."""
    config = config or FilterConfig()
    eval_users = {str(u) for u in eval_users}
    eval_targets = {(str(u), str(i)) for u, i in eval_targets}
    decisions = []
    for item in trajectories:
        t = item if isinstance(item, Trajectory) else Trajectory.from_dict(item)
        tokens = conversation_length(t, tokenizer, config.chars_per_token)
        decisions.append(Decision(t, check(t, config, tokens, eval_users, eval_targets), tokens, target_rank(t)))
    if config.one_per_task:
        _keep_best_per_task(decisions)
    return FilterResult(decisions, config, _counts(decisions))


def check(
    t: Trajectory,
    config: FilterConfig,
    tokens: int,
    eval_users: Collection[str] = frozenset(),
    eval_targets: Collection[tuple[str, str]] = frozenset(),
) -> list[str]:
    """Every rule ``t`` fails, in rule order (empty: it survives)."""
    reasons = []
    if t.split in config.forbidden_splits or t.user_id in eval_users or (t.user_id, t.target_item_id) in eval_targets:
        reasons.append(EVAL_LEAK)
    turns = [_reparse(t, message) for message in t.messages if message.get("role") == "assistant"]
    if config.require_clean_parse and (t.n_parse_issues or not _turns_clean(t, turns)):
        reasons.append(PARSE_ISSUES)
    if config.require_reasoning and not all(turn.analysis and turn.plan for turn, _ in turns):
        reasons.append(MISSING_REASONING)
    if config.require_valid_answer and not (t.valid and t.finish == "answer"):
        reasons.append(INVALID_ANSWER)
    rank_ok = config.top_k is not None and target_rank(t) <= config.top_k
    ndcg_ok = config.min_ndcg10 is not None and t.metrics.get("ndcg@10", 0.0) >= config.min_ndcg10
    if (config.top_k is not None or config.min_ndcg10 is not None) and not (rank_ok or ndcg_ok):
        reasons.append(LOW_RANK)
    if t.n_tool_calls < config.min_tool_calls:
        reasons.append(TOO_FEW_CALLS)
    refused = any(call.error_kind == BUDGET_EXHAUSTED for call in t.tool_calls)
    if config.max_tool_calls is not None and (t.n_tool_calls > config.max_tool_calls or refused):
        reasons.append(TOOL_BUDGET)
    failed = any(not call.ok and call.error_kind != BUDGET_EXHAUSTED for call in t.tool_calls)
    if config.forbid_failed_calls and (t.n_invalid_calls or failed):
        reasons.append(FAILED_CALLS)
    if config.forbid_repeated_calls and has_repeated_calls(t):
        reasons.append(REPEATED_CALLS)
    if config.max_tokens is not None and tokens > config.max_tokens:
        reasons.append(TOO_LONG)
    return reasons


# -- measurements -----------------------------------------------------------------------------


def target_rank(t: Trajectory) -> int:
    """1-based rank of the target in the final ranking (len + 1 when absent)."""
    return rank_below_absent(t.final_ranking, t.target_item_id)


def has_repeated_calls(t: Trajectory) -> bool:
    return count_repeated_calls(t.tool_calls) > 0


def conversation_length(t: Trajectory, tokenizer=None, chars_per_token: float = 2.8) -> int:
    """Tokens of the whole rendered conversation with its tool schemas (or the chars proxy).

    A tokenizer whose template does not render tools gets the agent's tool template first
    (in place, as every agent backend does), so the count is what the model really sees."""
    if tokenizer is not None:
        from recthinker_dagster.agent.backends.chat_template import (
            ensure_tool_chat_template,
        )

        ensure_tool_chat_template(tokenizer)
        ids = tokenizer.apply_chat_template(t.messages, tools=t.tools or None, tokenize=True, return_dict=True)
        return len(ids["input_ids"])
    chars = len(json.dumps(t.messages, ensure_ascii=False)) + sum(len(tool_line(tool)) for tool in t.tools)
    return int(chars / chars_per_token) + 1


def tool_line(schema: Mapping) -> str:
    """A tool as the compact template lists it: ``- name(arg, ...): description``."""
    spec = schema.get("function", schema)
    return f"- {spec['name']}({', '.join(spec.get('parameters', {}).get('properties', {}))}): {spec.get('description', '')}"


def assistant_text(message: Mapping) -> str:
    """An assistant message as the model wrote it: content, then its calls as Qwen2.5 renders them."""
    calls = [P.format_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    return "\n".join(part for part in [message.get("content") or "", *calls] if part)


def candidate_labels(t: Trajectory) -> dict[str, str]:
    """label -> item id in candidate order (A, B, ... or C1, C2, ...), read back from the final ranking."""
    pairs = zip(t.final_labels, t.final_ranking)
    return dict(sorted(pairs, key=lambda pair: (len(pair[0]), pair[0])))  # C9 before C10; A before B


def _reparse(t: Trajectory, message: Mapping) -> tuple[P.ParsedTurn, Mapping]:
    tool_names = {schema["function"]["name"] for schema in t.tools} or None
    return P.parse_turn(assistant_text(message), candidate_labels(t), tool_names), message


def _turns_clean(t: Trajectory, turns: list[tuple[P.ParsedTurn, Mapping]]) -> bool:
    if not turns:
        return False
    for k, (turn, message) in enumerate(turns):
        if turn.issues:
            return False
        last = k == len(turns) - 1
        if last != (turn.action == "answer"):  # calls on every turn but the last, then the answer
            return False
        recorded = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        if [(c.name, c.arguments) for c in turn.tool_calls] != recorded:
            return False
        if last and (turn.answer is None or turn.answer.ranking_labels != list(t.final_labels)):
            return False
    return True


def _keep_best_per_task(decisions: list[Decision]) -> None:
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, decision in enumerate(decisions):
        if decision.kept:
            by_task[decision.trajectory.task_id].append(index)
    for indexes in by_task.values():
        def preference(i: int):
            t = decisions[i].trajectory
            return (-t.metrics.get("ndcg@10", 0.0), t.n_tool_calls, decisions[i].tokens, i)

        for i in sorted(indexes, key=preference)[1:]:
            decisions[i].reasons.append(NOT_BEST_FOR_TASK)


def _counts(decisions: list[Decision]) -> dict:
    """Totals; ``by_reason`` counts every recorded reason (a trajectory can fail several rules),
    ``by_primary_reason`` only the first, so it sums to ``dropped``."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    by_producer: dict[str, Counter] = defaultdict(Counter)
    for d in decisions:
        verdict = "kept" if d.kept else "dropped"
        by_group[d.trajectory.group or "?"][verdict] += 1
        by_producer[d.trajectory.producer or "?"][verdict] += 1
    kept = sum(d.kept for d in decisions)
    return {
        "total": len(decisions),
        "kept": kept,
        "dropped": len(decisions) - kept,
        "by_reason": dict(Counter(r for d in decisions for r in d.reasons)),
        "by_primary_reason": dict(Counter(d.reason for d in decisions if not d.kept)),
        "by_group": {g: {"kept": c["kept"], "dropped": c["dropped"]} for g, c in sorted(by_group.items())},
        "by_producer": {p: {"kept": c["kept"], "dropped": c["dropped"]} for p, c in sorted(by_producer.items())},
    }
