"""Every GRPO reward, its edge cases, and the ordering the weights must keep."""

from __future__ import annotations

import math

import pytest

from recthinker_dagster.training.rewards import (
    REWARDS,
    RolloutOutcome,
    check_weights,
    format_reward,
    ranking_reward,
    reasoning_reward,
    register,
    repeated_calls,
    tool_efficiency_reward,
    trl_reward_functions,
    weighted_reward,
)


def outcome(rank=1, valid=True, answered=True, calls=2, invalid=0, parse=0, budget=8, n=20,
            repeated=0, sections=0) -> RolloutOutcome:
    return RolloutOutcome(valid=valid, answered=answered, target_rank=rank, n_candidates=n, n_tool_calls=calls,
                          n_invalid_calls=invalid, n_parse_issues=parse, max_tool_calls=budget,
                          n_repeated_calls=repeated, n_sections=sections)


def test_ranking_reward_is_ndcg_at_10_and_zero_for_invalid_answers():
    assert ranking_reward(outcome(rank=1)) == 1.0
    assert ranking_reward(outcome(rank=3)) == pytest.approx(1 / math.log2(4))
    assert ranking_reward(outcome(rank=10)) == pytest.approx(1 / math.log2(11))
    assert ranking_reward(outcome(rank=11)) == 0.0
    assert ranking_reward(outcome(rank=21)) == 0.0  # target absent
    assert ranking_reward(outcome(rank=1, valid=False)) == 0.0


def test_format_reward_is_paid_only_with_a_useful_clean_answer():
    assert format_reward(outcome(rank=5)) == 1.0
    assert format_reward(outcome(rank=6)) == 0.0  # right shape, useless ranking
    assert format_reward(outcome(rank=1, valid=False)) == 0.0
    assert format_reward(outcome(rank=1, answered=False)) == 0.0  # forced or fallback answer
    assert format_reward(outcome(rank=1, parse=1)) == 0.0
    assert format_reward(outcome(rank=7), correct_k=10) == 1.0


def test_tool_efficiency_pays_for_avoiding_redundant_calls_of_correct_rollouts_only():
    assert tool_efficiency_reward(outcome(calls=0)) == 0.0  # no calls at all earns nothing
    assert tool_efficiency_reward(outcome(calls=2)) == 1.0
    assert tool_efficiency_reward(outcome(calls=8)) == 1.0  # distinct valid calls are not redundant
    assert tool_efficiency_reward(outcome(calls=4, invalid=1)) == pytest.approx(0.75)
    assert tool_efficiency_reward(outcome(calls=4, invalid=1, repeated=1)) == pytest.approx(0.5)
    assert tool_efficiency_reward(outcome(calls=2, invalid=2)) == 0.0
    assert tool_efficiency_reward(outcome(rank=6, calls=2)) == 0.0
    assert tool_efficiency_reward(outcome(rank=1, valid=False, calls=2)) == 0.0


def test_repeated_calls_count_same_tool_and_arguments():
    from recthinker_dagster.agent.trajectory import ToolCallRecord

    def record(name, arguments, ok=True):
        return ToolCallRecord(turn=1, name=name, arguments=arguments, ok=ok, output_chars=10)

    records = [record("get_user_profile", {}), record("score_candidates", {"weights": {"a": 1, "b": 2}}),
               record("score_candidates", {"weights": {"b": 2, "a": 1}}), record("get_user_profile", {}),
               record("score_candidates", {"weights": {"a": 2}}), record("get_item_info", {"x": 1}, ok=False),
               record("get_item_info", {"x": 1}, ok=False)]
    assert repeated_calls(records) == 2  # failed calls are counted as invalid, not as repeats


def test_reasoning_reward_needs_every_think_section_and_a_useful_ranking():
    from types import SimpleNamespace

    assert reasoning_reward(outcome(rank=2, sections=3)) == 1.0
    assert reasoning_reward(outcome(rank=2, sections=2)) == 0.0  # <match> missing
    assert reasoning_reward(outcome(rank=6, sections=3)) == 0.0  # right shape, useless ranking
    assert reasoning_reward(outcome(rank=1, valid=False, sections=3)) == 0.0
    reply = "<user>horror</user><candidates>G: a slasher</candidates><match>G fits</match><answer>G, A</answer>"
    trajectory = SimpleNamespace(final_ranking=["g", "a"], target_item_id="g", valid=True, finish="answer",
                                 n_tool_calls=0, n_invalid_calls=0, n_parse_issues=0, tool_calls=[],
                                 messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"},
                                           {"role": "assistant", "content": reply}])
    assert RolloutOutcome.from_trajectory(trajectory, max_tool_calls=0).n_sections == 3


@pytest.mark.parametrize("weights", [{"ranking": 1.0, "format": 0.1, "tool_efficiency": 0.1},
                                     {"ranking": 1.0, "format": 5.0, "tool_efficiency": 5.0},
                                     {"ranking": 0.2, "tool_efficiency": 3.0},
                                     {"ranking": 1.0, "format": 0.1, "reasoning": 2.0}])
def test_no_incorrect_rollout_outscores_a_correct_one(weights):
    budget = 8
    correct = [outcome(rank=r, calls=c, invalid=i, budget=budget, answered=a, sections=s)
               for r in range(1, 6) for c in range(13) for i in range(0, c + 1, 2) for a in (True, False)
               for s in (0, 3)]
    incorrect = [outcome(rank=r, calls=c, valid=v, budget=budget, sections=s)
                 for r in range(1, 22) for c in range(13) for v in (True, False) if not (v and r <= 5) for s in (0, 3)]
    worst_correct = min(weighted_reward(o, weights) for o in correct)
    best_incorrect = max(weighted_reward(o, weights) for o in incorrect)
    assert worst_correct > best_incorrect


def test_weights_are_checked():
    with pytest.raises(ValueError, match="unknown rewards"):
        check_weights({"ranking": 1.0, "ndcg": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        check_weights({"ranking": 1.0, "tool_efficiency": -0.1})
    with pytest.raises(ValueError, match="at least one"):
        check_weights({})
    with pytest.raises(ValueError, match="already registered"):
        register("ranking")(lambda o: 0.0)


def test_trl_functions_read_the_rollout_outcomes_in_order():
    functions = trl_reward_functions({"ranking": 1.0, "format": 0.5})
    assert [f.__name__ for f in functions] == ["ranking", "format"]
    outcomes = [outcome(rank=1).to_dict(), outcome(rank=12).to_dict()]
    assert functions[0](prompts=["p", "p"], completions=["a", "b"], outcome=outcomes) == [1.0, 0.0]
    assert functions[1](prompts=["p", "p"], completions=["a", "b"], outcome=outcomes) == [1.0, 0.0]
    assert set(REWARDS) >= {"ranking", "format", "tool_efficiency"}
