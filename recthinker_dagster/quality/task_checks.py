"""Per-task helper columns for the task suite, derived with polars joins.

Great Expectations then only has to check simple column values (``== 0``, ``== n``), and a
failure names the task ids at fault.
"""

from __future__ import annotations

import polars as pl

HELD_OUT_SPLITS = ("valid", "eval")  # their targets must never be training-visible

CHECK_COLUMNS = (
    "n_candidates",  # len(candidate_item_ids)
    "n_distinct_candidates",
    "target_count_in_candidates",  # must be exactly 1
    "target_at_position",  # candidate_item_ids[target_position] == target_item_id
    "negatives_in_user_history",  # negatives the user interacted with (ever): must be 0
    "history_length_matches",  # history_length == len(history_item_ids)
    "history_items_not_before_target",  # history items with no interaction at or before
    #                                      the target's timestamp: must be 0
    "target_in_interactions",  # (user, target, timestamp) is a real interaction
    "leaked_target_rows",  # valid/eval target rows found in train_interactions: must be 0
)


def _count(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    return frame.group_by("task_id").agg(pl.len().cast(pl.Int64).alias(name))


def task_check_frame(
    tasks: pl.DataFrame, train_interactions: pl.DataFrame, all_interactions: pl.DataFrame
) -> pl.DataFrame:
    """``tasks``' scalar columns plus the ``CHECK_COLUMNS``, one row per task."""
    keys = ["user_id", "item_id", "timestamp"]
    all_interactions = all_interactions.join(  # only the task users matter
        tasks.select(pl.col("user_id").unique()), on="user_id", how="semi"
    )
    target_rows = tasks.select(
        "task_id", "split", "user_id",
        pl.col("target_item_id").alias("item_id"), pl.col("target_timestamp").alias("timestamp"),
    )
    candidates = tasks.select(
        "task_id", "user_id", "target_item_id", pl.col("candidate_item_ids").alias("item_id")
    ).explode("item_id")
    seen = all_interactions.select("user_id", "item_id").unique()
    first_seen = all_interactions.group_by("user_id", "item_id").agg(
        first_timestamp=pl.col("timestamp").min()
    )
    history = (
        tasks.select("task_id", "user_id", "target_timestamp",
                     pl.col("history_item_ids").alias("item_id"))
        .explode("item_id")
        .drop_nulls("item_id")
        .join(first_seen, on=["user_id", "item_id"], how="left")
    )

    derived = [
        _count(candidates.filter(pl.col("item_id") == pl.col("target_item_id")),
               "target_count_in_candidates"),
        _count(candidates.filter(pl.col("item_id") != pl.col("target_item_id"))
               .join(seen, on=["user_id", "item_id"], how="semi"), "negatives_in_user_history"),
        _count(history.filter(pl.col("first_timestamp").is_null()
                              | (pl.col("first_timestamp") > pl.col("target_timestamp"))),
               "history_items_not_before_target"),
        _count(target_rows.join(all_interactions.select(keys), on=keys, how="semi"),
               "target_in_interactions"),
        _count(target_rows.filter(pl.col("split").is_in(HELD_OUT_SPLITS))
               .join(train_interactions.select(keys), on=keys, how="inner"),
               "leaked_target_rows"),
    ]
    frame = tasks.select(
        pl.exclude("candidate_item_ids", "history_item_ids"),
        n_candidates=pl.col("candidate_item_ids").list.len().cast(pl.Int64),
        n_distinct_candidates=pl.col("candidate_item_ids").list.n_unique().cast(pl.Int64),
        target_at_position=(
            pl.col("candidate_item_ids").list.get(pl.col("target_position"), null_on_oob=True)
            == pl.col("target_item_id")
        ).fill_null(False),
        history_length_matches=(
            pl.col("history_length") == pl.col("history_item_ids").list.len()
        ).fill_null(False),
    )
    for counts in derived:
        frame = frame.join(counts, on="task_id", how="left")
    counted = [c.columns[1] for c in derived]
    return frame.with_columns(
        [pl.col(c).fill_null(0) for c in counted]
    ).with_columns(target_in_interactions=pl.col("target_in_interactions") > 0)
