"""What the tool indexes may see: :func:`index_interactions` (see the package docstring)."""

from __future__ import annotations

import polars as pl

TARGET_KEY = ("user_id", "item_id", "timestamp")


def index_interactions(train_interactions: pl.DataFrame, tasks: pl.DataFrame) -> pl.DataFrame:
    """The training-visible interactions minus every task's target interaction.

    Only train tasks' targets are in ``train_interactions`` (valid and eval targets never
    are); removing them leaves each task user with exactly its ``history_item_ids``.
    Rows are matched on ``(user_id, item_id, timestamp)``; input order is kept.
    """
    targets = tasks.select(
        pl.col("user_id"), pl.col("target_item_id").alias("item_id"),
        pl.col("target_timestamp").alias("timestamp"),
    ).unique()
    return train_interactions.join(targets, on=list(TARGET_KEY), how="anti", maintain_order="left")
