"""Ranking tasks for training, validation and evaluation.

A user with ``n`` interactions in ``(timestamp, order)`` order has a test target (position
``n-1``), a validation target (``n-2``) and a training-visible prefix (``0..n-3``).

- eval task  (eval users):  target = test target; history = the training-visible prefix.
- valid task (valid users): target = validation target; history = the training-visible prefix.
- train task (train users): target = last training-visible item; history = the prefix before it.

Eval tasks skip the validation item on purpose: the history is exactly what the tool
indexes (built from ``train_interactions``) know about the user, and those indexes never
contain validation or test targets. Histories are chronological, oldest first; the prompt
shows the last ``config.prompt_history_len`` of them.

Candidates (see ``candidates.py``): the target plus ``n_candidates - 1`` distinct items the
user never interacted with (future included), drawn from the items present in
``interactions``, shuffled; ``target_position`` indexes the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recthinker_dagster.data.schema import FrameSchema
from recthinker_dagster.protocol.candidates import sample_candidates
from recthinker_dagster.protocol.config import ProtocolConfig
from recthinker_dagster.protocol.splits import (
    GROUPS,
    SPLITS,
    assign_groups,
    check_interactions,
    chronological,
    sample_user_pools,
    training_visible,
)

TASKS_SCHEMA: FrameSchema = {
    "task_id": pl.Utf8,  # "<dataset>/<split>/<user_id>"
    "dataset": pl.Utf8,
    "split": pl.Utf8,  # train | valid | eval
    "group": pl.Utf8,  # sparse | dense
    "user_id": pl.Utf8,
    "target_item_id": pl.Utf8,
    "target_timestamp": pl.Int64,
    "history_item_ids": pl.List(pl.Utf8),  # chronological, oldest first
    "history_length": pl.Int32,
    "user_total_interactions": pl.Int32,
    "candidate_item_ids": pl.List(pl.Utf8),  # shuffled
    "target_position": pl.Int32,  # index of the target in candidate_item_ids
}


@dataclass
class TaskSplits:
    """The protocol's output for one dataset."""

    dataset: str
    config: ProtocolConfig
    train_interactions: pl.DataFrame  # training-visible interactions, input schema and order
    tasks: pl.DataFrame  # TASKS_SCHEMA, sorted by split, group, user_id

    def summary(self) -> dict[str, dict[str, int]]:
        """Task counts: ``{split: {group: n}}`` for every split and group (zeros included)."""
        counts = {(s, g): n for s, g, n in self.tasks.group_by("split", "group").len().iter_rows()}
        return {s: {g: counts.get((s, g), 0) for g in GROUPS} for s in SPLITS}


def build_task_splits(
    interactions: pl.DataFrame, config: ProtocolConfig, dataset: str
) -> TaskSplits:
    """Training-visible interactions and the train / valid / eval tasks of ``dataset``."""
    check_interactions(interactions)
    pools = sample_user_pools(assign_groups(interactions, config), config)
    catalog = interactions["item_id"].unique().sort()
    codes = pl.DataFrame({"item_id": catalog, "_code": np.arange(len(catalog))})

    sequences = (
        chronological(interactions.join(pools.select("user_id"), on="user_id", how="semi"))
        .join(codes, on="item_id", how="left")
        .group_by("user_id", maintain_order=True)
        .agg(_items=pl.col("item_id"), _times=pl.col("timestamp"), _codes=pl.col("_code"))
    )
    n = pl.col("_items").list.len()
    target_index = pl.when(pl.col("split") == "eval").then(n - 1).when(
        pl.col("split") == "valid").then(n - 2).otherwise(n - 3)
    history_length = pl.when(pl.col("split") == "train").then(n - 3).otherwise(n - 2)
    split_rank = pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)})
    group_rank = pl.col("group").replace_strict({g: i for i, g in enumerate(GROUPS)})
    tasks = (
        pools.join(sequences, on="user_id", how="inner")
        .with_columns(
            task_id=pl.concat_str(pl.lit(f"{dataset}/"), "split", pl.lit("/"), "user_id"),
            dataset=pl.lit(dataset),
            target_item_id=pl.col("_items").list.get(target_index),
            target_timestamp=pl.col("_times").list.get(target_index),
            _target_code=pl.col("_codes").list.get(target_index),
            history_item_ids=pl.col("_items").list.head(history_length),
            history_length=history_length.cast(pl.Int32),
            user_total_interactions=n.cast(pl.Int32),
        )
        .sort(split_rank, group_rank, pl.col("user_id"))
    )

    candidate_codes, positions = sample_candidates(
        targets=tasks["_target_code"].to_numpy(),
        seen_per_task=[np.unique(c) for c in tasks["_codes"].to_list()],
        keys=tasks["task_id"].to_list(),
        n_items=len(catalog),
        n_candidates=config.n_candidates,
        seed=config.seed,
    )
    item_ids = catalog.to_numpy()[candidate_codes]
    tasks = tasks.with_columns(
        candidate_item_ids=pl.Series(item_ids.tolist(), dtype=pl.List(pl.Utf8)),
        target_position=pl.Series(positions, dtype=pl.Int32),
    ).select([pl.col(c).cast(t) for c, t in TASKS_SCHEMA.items()])

    return TaskSplits(
        dataset=dataset,
        config=config,
        train_interactions=training_visible(interactions),
        tasks=tasks,
    )
