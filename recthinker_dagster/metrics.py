"""Ranking metrics for one held-out target per task (the only module that computes them).

A foundation module: recommenders, the agent loop, teachers and evaluation all import it,
so it imports nothing from the project.

A ranking is a list of candidate item ids, best first. The target's 0-based position in it
is its ``rank``; a ranking that omits the target (an invalid or partial answer) gives
rank ``None`` and scores 0 on every metric.

- NDCG@k = 1 / log2(rank + 2) if rank < k else 0   (one relevant item, so IDCG = 1)
- HR@k   = 1 if rank < k else 0
- MRR    = 1 / (rank + 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CUTOFFS = (1, 5, 10)


def target_rank(ranking: Sequence[str], target: str) -> int | None:
    try:
        return list(ranking).index(target)
    except ValueError:
        return None


def rank_below_absent(ranking: Sequence[str], target: str) -> int:
    """1-based rank of ``target`` in ``ranking``; ``len(ranking) + 1`` when it is absent, below
    every ranked item (the rewards and the quality filter judge an answer by it)."""
    rank = target_rank(ranking, target)
    return len(ranking) + 1 if rank is None else rank + 1


def ndcg_at_k(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def hit_at_k(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank < k else 0.0


def reciprocal_rank(rank: int | None) -> float:
    return 1.0 / (rank + 1) if rank is not None else 0.0


def task_metrics(ranking: Sequence[str], target: str, cutoffs: Sequence[int] = CUTOFFS) -> dict[str, float]:
    """All metrics of one task: ``ndcg@k``, ``hr@k`` for each cutoff, and ``mrr``."""
    rank = target_rank(ranking, target)
    metrics = {f"ndcg@{k}": ndcg_at_k(rank, k) for k in cutoffs}
    metrics.update({f"hr@{k}": hit_at_k(rank, k) for k in cutoffs})
    metrics["mrr"] = reciprocal_rank(rank)
    return metrics


def mean_metrics(per_task: Sequence[dict[str, float]]) -> dict[str, float]:
    if not per_task:
        return {}
    return {name: float(np.mean([m[name] for m in per_task])) for name in per_task[0]}


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


@dataclass(frozen=True)
class PairedTest:
    """One-sided paired bootstrap test of "system a beats system b" on the same tasks."""

    effect: float  # mean of a - b (with strata: the unweighted mean of the strata's mean differences)
    ci_low: float  # 95% percentile-bootstrap interval of the effect
    ci_high: float
    p_value: float  # one-sided, H0: effect <= 0
    n_tasks: int
    n_resamples: int
    method: str = "paired bootstrap"

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    strata: Sequence[str] | None = None,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedTest:
    """Does ``a`` beat ``b``? ``a[i]`` and ``b[i]`` are the two systems' scores on task ``i``.

    Tasks are resampled with replacement (within each stratum, e.g. a dataset's group, so every
    stratum keeps its size and the effect stays the unweighted mean over strata). The p-value is
    the share of resampled effects of the *null-centred* differences at or above the observed
    effect, with the usual +1 correction, so it is never 0."""
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.ndim != 1 or first.shape != second.shape:  # before subtracting: numpy would broadcast [x, y] - [z]
        raise ValueError(f"paired scores must be two equal-length lists, got {first.size} and {second.size}")
    diffs = first - second
    if diffs.size == 0:
        raise ValueError("a paired test needs at least one task")
    labels = np.asarray(strata if strata is not None else [""] * diffs.size)
    if labels.shape != diffs.shape:
        raise ValueError(f"strata must label every task: {labels.size} labels for {diffs.size} tasks")
    rng = np.random.default_rng(seed)
    observed_parts, resampled_parts = [], []
    for stratum in sorted(set(labels.tolist())):
        part = diffs[labels == stratum]
        observed_parts.append(part.mean())
        resampled_parts.append(part[rng.integers(0, part.size, size=(n_resamples, part.size))].mean(axis=1))
    observed = float(np.mean(observed_parts))
    resampled = np.mean(resampled_parts, axis=0)
    null = resampled - observed  # centring every stratum on 0 shifts the unweighted mean by the effect
    p_value = float((1 + np.count_nonzero(null >= observed - 1e-12)) / (n_resamples + 1))
    low, high = np.quantile(resampled, [0.025, 0.975])
    return PairedTest(effect=observed, ci_low=float(low), ci_high=float(high), p_value=min(p_value, 1.0),
                      n_tasks=int(diffs.size), n_resamples=n_resamples)
