"""Run a recommender over protocol tasks and summarize its metrics per group.

``evaluate_recommender`` scores each task's candidates with the user's history (never the
target), ranks them with seeded random tie-breaking, and computes every metric of
``recthinker_dagster.metrics``. ``summarize`` gives means, 95% bootstrap intervals and task counts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import polars as pl

from recthinker_dagster.data.schema import FrameSchema
from recthinker_dagster.metrics import CUTOFFS, bootstrap_ci, task_metrics
from recthinker_dagster.recommenders.base import Recommender, rank_by_scores

METRICS = [f"ndcg@{k}" for k in CUTOFFS] + [f"hr@{k}" for k in CUTOFFS] + ["mrr"]


def task_seed(seed: int, task_id: str) -> int:
    """A stable per-task tie-breaking seed (same in every process)."""
    return zlib.crc32(f"{seed}/{task_id}".encode())


def evaluate_recommender(recommender: Recommender, tasks: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """One row per task: task_id, split, group, user_id, ranking (best first),
    target_item_id and every metric (``ndcg@k``, ``hr@k``, ``mrr``)."""
    rows = []
    for task in tasks.iter_rows(named=True):
        candidates = list(task["candidate_item_ids"])
        scores = recommender.score(task["user_id"], list(task["history_item_ids"]), candidates)
        if len(scores) != len(candidates):
            raise ValueError(f"{recommender.name} returned {len(scores)} scores for "
                             f"{len(candidates)} candidates (task {task['task_id']})")
        ranking = rank_by_scores(candidates, scores, seed=task_seed(seed, task["task_id"]))
        rows.append({
            "task_id": task["task_id"], "split": task["split"], "group": task["group"],
            "user_id": task["user_id"], "ranking": ranking,
            "target_item_id": task["target_item_id"],
            **task_metrics(ranking, task["target_item_id"]),
        })
    schema: FrameSchema = {"task_id": pl.Utf8, "split": pl.Utf8, "group": pl.Utf8, "user_id": pl.Utf8,
              "ranking": pl.List(pl.Utf8), "target_item_id": pl.Utf8,
              **{m: pl.Float64 for m in METRICS}}
    return pl.DataFrame(rows, schema=schema)


def summarize(per_task: pl.DataFrame, by: Sequence[str] = ("group",), *,
              metrics: Sequence[str] = METRICS, n_resamples: int = 1000,
              seed: int = 0) -> pl.DataFrame:
    """Per ``by`` group (one row overall when ``by`` is empty): ``n_tasks`` and, per metric,
    its mean plus ``<metric>_lo`` / ``<metric>_hi``, the 95% percentile-bootstrap interval."""
    by = list(by)
    groups = per_task.partition_by(by, maintain_order=True, as_dict=True) if by else {(): per_task}
    rows = []
    for key, frame in groups.items():
        row = dict(zip(by, key)) | {"n_tasks": frame.height}
        for metric in metrics:
            values = frame[metric].to_numpy()
            lo, hi = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
            row |= {metric: float(values.mean()) if values.size else float("nan"),
                    f"{metric}_lo": lo, f"{metric}_hi": hi}
        rows.append(row)
    return pl.DataFrame(rows)
