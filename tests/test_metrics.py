"""Metrics against hand-computed cases."""

import math

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
