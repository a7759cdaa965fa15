"""Great Expectations suites for interactions, items, users and tasks.

Each ``validate_*`` takes polars frames and returns a ``QualityResult``; nothing raises on
bad data. Suites are built in code; see ``runner.py`` for how they run.
"""

from __future__ import annotations

import functools
import time

import polars as pl

from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    RATING_RANGE,
    USERS_SCHEMA,
)
from recthinker_dagster.protocol.tasks import TASKS_SCHEMA
from recthinker_dagster.quality.runner import QualityResult, gx, run_suite
from recthinker_dagster.quality.task_checks import task_check_frame

ML1M_AGES = [1, 18, 25, 35, 45, 50, 56]
TASK_SPLITS = ["train", "valid", "eval"]
TASK_GROUPS = ["sparse", "dense"]


def _timed(validate):
    """Record the whole call (conversion and derived columns included) as ``seconds``."""

    @functools.wraps(validate)
    def wrapper(*args, **kwargs) -> QualityResult:
        started = time.perf_counter()
        result = validate(*args, **kwargs)
        result.statistics["seconds"] = round(time.perf_counter() - started, 3)
        return result

    return wrapper


def _to_pandas(frame: pl.DataFrame):
    """pandas for GE, shaped for speed: GE hashes the whole frame twice per validation and
    string columns hash slowly (categoricals fast); its range check is vectorized only for
    float64/int64 columns."""
    return frame.with_columns(
        pl.col(pl.Float32).cast(pl.Float64),
        pl.col(pl.Int32).cast(pl.Int64),
        pl.col(pl.Utf8).cast(pl.Categorical),
    ).to_pandas()


def _columns_exist(columns) -> list:
    E = gx().expectations
    return [E.ExpectColumnToExist(column=c) for c in columns]


def _not_null(columns) -> list:
    E = gx().expectations
    return [E.ExpectColumnValuesToNotBeNull(column=c) for c in columns]


@_timed
def validate_interactions(df: pl.DataFrame) -> QualityResult:
    """Schema, key nulls, rating 1..5, timestamp > 0, (user, item, timestamp) unique."""
    E = gx().expectations
    low, high = RATING_RANGE
    expectations = [
        *_columns_exist(INTERACTIONS_SCHEMA),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(["user_id", "item_id", "timestamp", "order"]),
        E.ExpectColumnValuesToBeBetween(column="rating", min_value=low, max_value=high),
        E.ExpectColumnValuesToBeBetween(column="timestamp", min_value=0, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="order", min_value=0),
        E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp"]),
    ]
    return run_suite("interactions", _to_pandas(df), expectations)


@_timed
def validate_items(df: pl.DataFrame) -> QualityResult:
    """Schema, item_id present and unique, has_metadata set (and only with a title), plausible years."""
    E = gx().expectations
    expectations = [
        *_columns_exist(ITEMS_SCHEMA),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(["item_id", "has_metadata"]),
        E.ExpectColumnValuesToBeUnique(column="item_id"),
        E.ExpectColumnValuesToBeBetween(column="year", min_value=1800, max_value=2100),
    ]
    if {"has_metadata", "title"} <= set(df.columns):  # an item has metadata only with a title
        df = df.with_columns(metadata_without_title=pl.col("has_metadata") & pl.col("title").is_null())
        expectations.append(E.ExpectColumnValuesToBeInSet(column="metadata_without_title", value_set=[False]))
    return run_suite("items", _to_pandas(df), expectations, index_column="item_id")


@_timed
def validate_users(df: pl.DataFrame) -> QualityResult:
    """Schema, user_id present and unique, known genders and ML-1M age brackets (or null)."""
    E = gx().expectations
    expectations = [
        *_columns_exist(USERS_SCHEMA),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(["user_id", "has_demographics"]),
        E.ExpectColumnValuesToBeUnique(column="user_id"),
        E.ExpectColumnValuesToBeInSet(column="gender", value_set=["M", "F"]),
        E.ExpectColumnValuesToBeInSet(column="age", value_set=ML1M_AGES),
    ]
    return run_suite("users", _to_pandas(df), expectations, index_column="user_id")


@_timed
def validate_tasks(
    tasks: pl.DataFrame,
    train_interactions: pl.DataFrame,
    all_interactions: pl.DataFrame,
    n_candidates: int,
) -> QualityResult:
    """Task schema and keys, candidate validity, and no held-out target leakage.

    Blocking: a valid/eval target (user, item, timestamp) found in ``train_interactions``,
    a target missing from (or repeated in) its candidates, duplicated candidates, or a
    negative the user interacted with.
    """
    E = gx().expectations
    missing = [c for c in TASKS_SCHEMA if c not in tasks.columns]
    if missing:  # the helper columns cannot be derived: report the schema only
        frame = _to_pandas(tasks.head(0))
        return run_suite("tasks", frame, _columns_exist(TASKS_SCHEMA))
    n = n_candidates
    expectations = [
        *_columns_exist(c for c in TASKS_SCHEMA if c not in ("candidate_item_ids",
                                                              "history_item_ids")),
        *_not_null(["task_id", "split", "group", "user_id", "target_item_id",
                    "target_timestamp"]),
        E.ExpectColumnValuesToBeUnique(column="task_id"),
        E.ExpectColumnValuesToBeUnique(column="user_id"),  # user pools are disjoint
        E.ExpectColumnValuesToBeInSet(column="split", value_set=TASK_SPLITS),
        E.ExpectColumnValuesToBeInSet(column="group", value_set=TASK_GROUPS),
        E.ExpectColumnValuesToBeBetween(column="target_timestamp", min_value=0, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="history_length", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="n_candidates", min_value=n, max_value=n),
        E.ExpectColumnValuesToBeBetween(column="n_distinct_candidates", min_value=n, max_value=n),
        E.ExpectColumnValuesToBeInSet(column="target_count_in_candidates", value_set=[1]),
        E.ExpectColumnValuesToBeInSet(column="target_at_position", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="negatives_in_user_history", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="history_length_matches", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="history_items_not_before_target", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="target_in_interactions", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="leaked_target_rows", value_set=[0]),
    ]
    frame = _to_pandas(task_check_frame(tasks, train_interactions, all_interactions))
    return run_suite("tasks", frame, expectations, index_column="task_id")


@_timed
def validate_sft_examples(kept: pl.DataFrame, eval_tasks: pl.DataFrame, min_examples: int) -> QualityResult:
    """The SFT training set: enough examples, both user groups, train tasks only, one per task,
    and no eval-task user or (user, target) pair of the same dataset. Blocking.

    ``kept`` has columns dataset, task_id, split, group, user_id, target_item_id; ``eval_tasks``
    dataset, user_id, target_item_id."""
    E = gx().expectations
    required = ["dataset", "task_id", "split", "group", "user_id", "target_item_id"]
    missing = [c for c in required if c not in kept.columns]
    if missing:
        return run_suite("sft_examples", _to_pandas(kept.head(0)), _columns_exist(required))

    def keys(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(
            user_key=pl.concat_str([pl.col("dataset"), pl.col("user_id").cast(pl.Utf8)], separator="|"),
            pair_key=pl.concat_str([pl.col("dataset"), pl.col("user_id").cast(pl.Utf8),
                                    pl.col("target_item_id").cast(pl.Utf8)], separator="|"),
        )

    eval_keys = keys(eval_tasks.select("dataset", "user_id", "target_item_id"))
    expectations = [
        *_columns_exist(required),
        E.ExpectTableRowCountToBeBetween(min_value=max(1, min_examples)),
        *_not_null(required),
        E.ExpectColumnValuesToBeUnique(column="task_id"),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train"]),
        E.ExpectColumnDistinctValuesToContainSet(column="group", value_set=TASK_GROUPS),
        E.ExpectColumnValuesToNotBeInSet(column="user_key", value_set=sorted(set(eval_keys["user_key"].to_list()))),
        E.ExpectColumnValuesToNotBeInSet(column="pair_key", value_set=sorted(set(eval_keys["pair_key"].to_list()))),
    ]
    frame = keys(kept.select(required)).with_columns(task_id=pl.concat_str(["dataset", "task_id"], separator="|"))
    return run_suite("sft_examples", _to_pandas(frame), expectations, index_column="task_id")
