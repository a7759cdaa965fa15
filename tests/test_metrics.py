"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from recthinker_dagster.metrics import bootstrap_ci, mean_metrics, task_metrics


def test_target_first_scores_one_everywhere():
    m = task_metrics(["a", "b", "c"], "a")
    assert m == {"ndcg@1": 1.0, "ndcg@5": 1.0, "ndcg@10": 1.0, "hr@1": 1.0, "hr@5": 1.0, "hr@10": 1.0, "mrr": 1.0}


def test_target_third_matches_hand_computation():
    m = task_metrics(["a", "b", "t", "d"], "t")
    assert m["ndcg@1"] == 0.0 and m["hr@1"] == 0.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert m["hr@5"] == 1.0 and m["mrr"] == pytest.approx(1 / 3)


def test_target_beyond_cutoff_and_missing_target():
    ranking = [str(i) for i in range(20)]
    m = task_metrics(ranking, "12")
    assert m["ndcg@10"] == 0.0 and m["hr@10"] == 0.0 and m["mrr"] == pytest.approx(1 / 13)
    assert all(v == 0.0 for v in task_metrics(["a", "b"], "zzz").values())


def test_the_one_based_rank_puts_an_absent_target_below_every_item():
    from recthinker_dagster.metrics import rank_below_absent

    assert rank_below_absent(["a", "b", "t"], "t") == 3 and rank_below_absent(["t"], "t") == 1
    assert rank_below_absent(["a", "b"], "zzz") == 3 and rank_below_absent([], "t") == 1


@pytest.mark.parametrize("k", [1, 5, 10])
def test_cutoffs_at_rank_exactly_k(k):
    """The target at position k (1-based) counts, at position k + 1 it does not; the GRPO
    ranking reward uses the same function."""
    from recthinker_dagster.training.rewards import ndcg_at

    ranking = [str(i) for i in range(20)]
    inside, outside = task_metrics(ranking, str(k - 1)), task_metrics(ranking, str(k))
    assert inside[f"hr@{k}"] == 1.0 and inside[f"ndcg@{k}"] == pytest.approx(1 / math.log2(k + 1))
    assert outside[f"hr@{k}"] == 0.0 and outside[f"ndcg@{k}"] == 0.0
    assert ndcg_at(k, k) == inside[f"ndcg@{k}"] and ndcg_at(k + 1, k) == 0.0


def test_mean_and_bootstrap_interval_contains_mean():
    per_task = [task_metrics(["t", "x"], "t"), task_metrics(["x", "t"], "t")]
    mean = mean_metrics(per_task)
    assert mean["ndcg@1"] == 0.5 and mean["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    low, high = bootstrap_ci([0.0, 1.0] * 50, seed=1)
    assert low < 0.5 < high and high - low < 0.3
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)


def test_paired_test_finds_a_consistent_win_significant():
    from recthinker_dagster.metrics import paired_bootstrap_test

    rng = np.random.default_rng(1)
    base = rng.random(100)
    result = paired_bootstrap_test(base + 0.08 + rng.normal(0, 0.1, 100), base, seed=0)
    assert result.p_value < 0.01 and result.ci_low > 0 and 0.05 < result.effect < 0.11
    assert result.n_tasks == 100


def test_paired_test_calls_noise_and_losses_not_significant():
    from recthinker_dagster.metrics import paired_bootstrap_test

    rng = np.random.default_rng(2)
    a, b = rng.random(60), rng.random(60)  # two unrelated systems of equal quality
    noise = paired_bootstrap_test(a, b, seed=0)
    assert noise.p_value > 0.05 and noise.ci_low < 0 < noise.ci_high
    assert paired_bootstrap_test(b - 0.1, b, seed=0).p_value == 1.0  # a sure loss
    assert paired_bootstrap_test(b, b, seed=0).p_value == 1.0  # a tie is no win
    small_win = paired_bootstrap_test([1.0, 0.0, 0.5], [0.0, 0.5, 0.5], seed=0)  # three tasks: a win, a loss, a tie
    assert small_win.p_value > 0.05


def test_paired_test_strata_keep_their_size_and_weigh_the_same():
    from recthinker_dagster.metrics import paired_bootstrap_test

    a = [1.0] * 10 + [0.0] * 2
    b = [0.0] * 10 + [0.0] * 2
    strata = ["dense"] * 10 + ["sparse"] * 2
    result = paired_bootstrap_test(a, b, strata, seed=0)
    assert result.effect == pytest.approx(0.5)  # the unweighted mean of +1 (dense) and 0 (sparse), not 10/12
    assert result.ci_low == pytest.approx(0.5) and result.ci_high == pytest.approx(0.5)  # no stratum changes size
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_test([1.0, 0.0], [1.0], seed=0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_test([1.0, 0.0, 1.0], [1.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="at least one task"):
        paired_bootstrap_test([], [], seed=0)
    with pytest.raises(ValueError, match="label every task"):
        paired_bootstrap_test([1.0, 0.0], [0.0, 0.0], ["a"], seed=0)
