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

import numpy as np

CUTOFFS = (1, 5, 10)


def target_rank(ranking: Sequence[str], target: str) -> int | None:
    try:
        return list(ranking).index(target)
    except ValueError:
        return None


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
