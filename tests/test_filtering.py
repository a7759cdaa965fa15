"""Trajectory filtering: each rule alone, the per-task preference, the eval-leak guard, the counts.

The trajectories are real: a scripted investigator backend runs the agent loop over the real
tools on ML-1M (``tests/support/trajectories.py``); each rule is tested on a copy of a clean one
changed in exactly one respect.
"""

from __future__ import annotations

import copy

import pytest

from recthinker_dagster.agent import ToolCallRecord, Trajectory
from recthinker_dagster.training.filtering import (
    EVAL_LEAK,
    FAILED_CALLS,
    INVALID_ANSWER,
    LOW_RANK,
    MISSING_REASONING,
    NOT_BEST_FOR_TASK,
    PARSE_ISSUES,
    REPEATED_CALLS,
    TOO_FEW_CALLS,
    TOO_LONG,
    TOOL_BUDGET,
    FilterConfig,
    conversation_length,
    filter_trajectories,
    target_rank,
)
from tests.support.trajectories import real_trajectories

LOOSE = FilterConfig(top_k=20)  # every rule on, any rank accepted


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    return list(real_trajectories("train"))


@pytest.fixture
def clean(trajectories) -> Trajectory:
    """A fresh copy of a real trajectory that passes every rule (target in the top 3)."""
    best = next(t for t in trajectories if target_rank(t) <= 3)
    return Trajectory.from_dict(copy.deepcopy(best.to_dict()))


def reasons_of(t: Trajectory, config: FilterConfig = LOOSE, **kwargs) -> list[str]:
    (decision,) = filter_trajectories([t], config, **kwargs).decisions
    return decision.reasons


def test_the_clean_trajectory_is_kept(clean):
    assert clean.valid and clean.finish == "answer" and clean.n_tool_calls == 2
    result = filter_trajectories([clean], FilterConfig(top_k=3))
    assert result.kept == [clean] and result.dropped == []
    assert result.decisions[0].reasons == [] and result.decisions[0].reason is None


@pytest.mark.parametrize("leak", ["split", "user", "target"])
def test_eval_leak_guard(clean, leak):
    kwargs = {}
    if leak == "split":
        clean.split = "eval"
    elif leak == "user":
        kwargs["eval_users"] = {clean.user_id}
    else:
        kwargs["eval_targets"] = {(clean.user_id, clean.target_item_id)}
    assert reasons_of(clean, **kwargs) == [EVAL_LEAK]


def test_other_users_eval_targets_are_no_leak(clean):
    assert reasons_of(clean, eval_users={"someone-else"}, eval_targets={("someone-else", clean.target_item_id)}) == []


def test_recorded_parse_issues(clean):
    clean.n_parse_issues = 1
    assert reasons_of(clean) == [PARSE_ISSUES]


def test_an_assistant_turn_that_does_not_reparse(clean):
    first = next(m for m in clean.messages if m["role"] == "assistant")
    first["content"] += '\n<tool_call>{"name": "get_item_info", "arguments": {</tool_call>'
    assert reasons_of(clean) == [PARSE_ISSUES]


def test_a_conversation_that_does_not_end_with_its_answer(clean):
    clean.messages = clean.messages[:-1]  # the last turn is now the tool-call turn
    assert reasons_of(clean) == [PARSE_ISSUES]


def test_missing_analysis_or_plan(clean):
    first = next(m for m in clean.messages if m["role"] == "assistant")
    first["content"] = first["content"].split("\nPlan:")[0]
    assert reasons_of(clean) == [MISSING_REASONING]
    assert reasons_of(clean, FilterConfig(top_k=20, require_reasoning=False)) == []


@pytest.mark.parametrize("change", [{"valid": False}, {"finish": "forced_answer"}, {"finish": "fallback"}])
def test_invalid_or_forced_answers(clean, change):
    for key, value in change.items():
        setattr(clean, key, value)
    assert reasons_of(clean) == [INVALID_ANSWER]


def test_target_rank_or_ndcg_threshold(clean):
    rank, ndcg = target_rank(clean), clean.metrics["ndcg@10"]
    assert reasons_of(clean, FilterConfig(top_k=rank)) == []
    assert reasons_of(clean, FilterConfig(top_k=rank - 1)) == [LOW_RANK]
    assert reasons_of(clean, FilterConfig(top_k=None, min_ndcg10=ndcg + 0.01)) == [LOW_RANK]
    assert reasons_of(clean, FilterConfig(top_k=None, min_ndcg10=ndcg)) == []
    # either criterion is enough
    assert reasons_of(clean, FilterConfig(top_k=max(rank - 1, 0), min_ndcg10=ndcg)) == []
    assert reasons_of(clean, FilterConfig(top_k=None, min_ndcg10=None)) == []  # rule off


def test_too_few_tool_calls(clean):
    assert reasons_of(clean, FilterConfig(top_k=20, min_tool_calls=3)) == [TOO_FEW_CALLS]


def test_tool_call_budget(clean):
    assert reasons_of(clean, FilterConfig(top_k=20, max_tool_calls=1)) == [TOOL_BUDGET]
    refused = ToolCallRecord(turn=1, name="get_item_info", arguments={"item_ids": ["C1"]}, ok=False,
                             output_chars=60, error_kind="budget_exhausted")
    clean.tool_calls.append(refused)
    assert reasons_of(clean) == [TOOL_BUDGET]


def test_failed_tool_calls(clean):
    clean.tool_calls[1].ok, clean.tool_calls[1].error_kind = False, "bad_arguments"
    assert reasons_of(clean) == [FAILED_CALLS]
    clean.tool_calls[1].ok, clean.tool_calls[1].error_kind = True, None
    clean.n_invalid_calls = 1
    assert reasons_of(clean) == [FAILED_CALLS]


def test_repeated_identical_calls(clean):
    clean.tool_calls.append(copy.deepcopy(clean.tool_calls[1]))
    clean.n_tool_calls += 1
    assert reasons_of(clean) == [REPEATED_CALLS]
    clean.tool_calls[-1].arguments = {"item_ids": ["C1"]}  # same tool, other arguments: fine
    assert reasons_of(clean) == []


def test_length_limit_with_the_chars_proxy(clean):
    proxy = conversation_length(clean, None, 2.8)
    assert 1000 < proxy < 2000  # ~1.3k tokens
    assert reasons_of(clean, FilterConfig(top_k=20, max_tokens=proxy - 1)) == [TOO_LONG]
    assert reasons_of(clean, FilterConfig(top_k=20, max_tokens=proxy)) == []


def test_length_limit_with_the_tokenizer(clean, prepared_base_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_base_model[0])
    tokens = conversation_length(clean, tokenizer)  # installs the tool template on the tokenizer
    assert tokens == len(tokenizer.apply_chat_template(clean.messages, tools=clean.tools, tokenize=True,
                                                       return_dict=True)["input_ids"])
    # the proxy is close: 2.8-2.9 chars per token on the scripted teacher's conversations, 3.2 on
    # these short, tool-output-heavy ones with single-token labels
    assert abs(conversation_length(clean, None, 2.8) - tokens) / tokens < 0.2
    result = filter_trajectories([clean], FilterConfig(top_k=20, max_tokens=tokens - 1), tokenizer=tokenizer)
    assert result.decisions[0].reasons == [TOO_LONG] and result.decisions[0].tokens == tokens
    assert reasons_of(clean, FilterConfig(top_k=20, max_tokens=tokens), tokenizer=tokenizer) == []


def test_every_failed_rule_is_recorded_in_order(clean):
    clean.split, clean.valid, clean.n_invalid_calls = "eval", False, 2
    assert reasons_of(clean, FilterConfig(top_k=20, max_tool_calls=1)) == [EVAL_LEAK, INVALID_ANSWER, TOOL_BUDGET,
                                                                           FAILED_CALLS]


def _variant(t: Trajectory, producer: str, ndcg: float, calls: int, padding: str = "") -> Trajectory:
    copy_ = Trajectory.from_dict(copy.deepcopy(t.to_dict()))
    copy_.producer, copy_.metrics["ndcg@10"], copy_.n_tool_calls = producer, ndcg, calls
    copy_.messages[-1]["content"] = copy_.messages[-1]["content"].replace("Plan:", f"Plan:{padding}", 1)
    return copy_


def test_one_trajectory_per_task_best_ndcg_then_fewest_calls_then_shortest(clean, trajectories):
    lower = _variant(clean, "teacher-a", 0.5, 1)
    long_ = _variant(clean, "teacher-b", 1.0, 2, padding=" and a much longer explanation" * 5)
    short = _variant(clean, "teacher-c", 1.0, 2)
    broken = _variant(clean, "teacher-d", 1.0, 1)
    broken.valid = False
    other_task = next(t for t in trajectories if t.task_id != clean.task_id and target_rank(t) <= 3)
    result = filter_trajectories([lower, long_, short, broken, other_task], FilterConfig(top_k=3))
    assert [d.reasons for d in result.decisions] == [
        [NOT_BEST_FOR_TASK], [NOT_BEST_FOR_TASK], [], [INVALID_ANSWER], []]
    assert result.kept == [short, other_task]

    fewer_calls = _variant(clean, "teacher-e", 1.0, 1, padding=" longer" * 20)
    result = filter_trajectories([short, fewer_calls], FilterConfig(top_k=3))
    assert result.kept == [fewer_calls]  # fewer calls beat fewer tokens
    tie = filter_trajectories([short, _variant(clean, "teacher-f", 1.0, 2)], FilterConfig(top_k=3))
    assert tie.kept == [short]  # full tie: the first one
    keep_all = filter_trajectories([lower, short], FilterConfig(top_k=3, one_per_task=False))
    assert keep_all.kept == [lower, short]


def test_counts_by_reason_group_and_producer(clean):
    a = _variant(clean, "teacher-a", 1.0, 2)
    b = _variant(clean, "teacher-b", 0.9, 2)
    c = _variant(clean, "teacher-b", 1.0, 2)
    c.split, c.valid = "eval", False
    d = _variant(clean, "teacher-a", 1.0, 2)
    d.task_id, d.group = "ml-1m/train/other", "sparse" if clean.group == "dense" else "dense"
    result = filter_trajectories([a, b, c, d], FilterConfig(top_k=3))
    counts = result.counts
    assert (counts["total"], counts["kept"], counts["dropped"]) == (4, 2, 2)
    assert counts["by_reason"] == {NOT_BEST_FOR_TASK: 1, EVAL_LEAK: 1, INVALID_ANSWER: 1}
    assert counts["by_primary_reason"] == {NOT_BEST_FOR_TASK: 1, EVAL_LEAK: 1}
    assert counts["by_group"] == {clean.group: {"kept": 1, "dropped": 2}, d.group: {"kept": 1, "dropped": 0}}
    assert counts["by_producer"] == {"teacher-a": {"kept": 2, "dropped": 0}, "teacher-b": {"kept": 0, "dropped": 2}}
    rows = result.records()
    assert [r["kept"] for r in rows] == [True, False, False, True] and rows[2]["reasons"] == [EVAL_LEAK, INVALID_ANSWER]


def test_a_real_batch_from_dicts(trajectories):
    rows = [t.to_dict() for t in trajectories]
    eval_users = {trajectories[0].user_id}
    result = filter_trajectories(rows, FilterConfig(top_k=3), eval_users=eval_users)
    counts = result.counts
    assert counts["total"] == len(trajectories) == counts["kept"] + counts["dropped"]
    assert sum(counts["by_primary_reason"].values()) == counts["dropped"]
    assert sum(v["kept"] + v["dropped"] for v in counts["by_group"].values()) == len(trajectories)
    assert counts["by_producer"]["scripted-investigator"]["kept"] == counts["kept"] > 0
    assert all(target_rank(t) <= 3 and t.user_id not in eval_users for t in result.kept)
    assert len({t.task_id for t in result.kept}) == len(result.kept)
    assert set(counts["by_reason"]) <= {LOW_RANK, EVAL_LEAK}  # the scripted investigator is otherwise clean


def test_config_from_dict():
    config = FilterConfig.from_dict({"top_k": 1, "forbidden_splits": ["eval", "valid"]})
    assert config.top_k == 1 and config.forbidden_splits == ("eval", "valid")
    assert FilterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown filter settings"):
        FilterConfig.from_dict({"top_kk": 1})
