"""Great Expectations suites: pass on real ML-1M frames and protocol output, fail readably
on broken data."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from recthinker_dagster.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.quality import (
    QualityResult,
    validate_interactions,
    validate_items,
    validate_tasks,
    validate_users,
)
from tests.support.paths import require_shared

N = 20  # candidates per task


def _lines(name: str, encoding: str) -> list[list[str]]:
    path = require_shared("ml-1m", name)
    with gzip.open(path, "rt", encoding=encoding) as f:
        return [line.rstrip("\n").split("::") for line in f]


@pytest.fixture(scope="module")
def interactions() -> pl.DataFrame:
    """``UserID::MovieID::Rating::Timestamp``; ``order`` is the line number."""
    path = require_shared("ml-1m", "ratings.dat.gz")
    raw = pl.read_csv(
        path, has_header=False, separator=":",  # "::" reads as ":" with empty columns between
        schema={"user_id": pl.Utf8, "_a": pl.Utf8, "item_id": pl.Utf8, "_b": pl.Utf8,
                "rating": pl.Float32, "_c": pl.Utf8, "timestamp": pl.Int64},
    )
    return raw.with_row_index("order").select(
        [pl.col(c).cast(t) for c, t in INTERACTIONS_SCHEMA.items()]
    )


@pytest.fixture(scope="module")
def items() -> pl.DataFrame:
    rows = _lines("movies.dat.gz", "latin-1")  # MovieID::Title (Year)::Genre|Genre
    titles = pl.Series([r[1] for r in rows])
    return pl.DataFrame({
        "item_id": [r[0] for r in rows],
        "title": titles.str.replace(r"\s*\(\d{4}\)$", ""),
        "year": titles.str.extract(r"\((\d{4})\)$").cast(pl.Int32),
        "categories": [r[2].split("|") for r in rows],
        "creator": None, "description": None, "has_metadata": True,
    }, schema=ITEMS_SCHEMA)


@pytest.fixture(scope="module")
def users() -> pl.DataFrame:
    rows = _lines("users.dat.gz", "ascii")  # UserID::Gender::Age::Occupation::Zip
    return pl.DataFrame({
        "user_id": [r[0] for r in rows], "gender": [r[1] for r in rows],
        "age": [int(r[2]) for r in rows], "occupation": [r[3] for r in rows],
        "zip_code": [r[4] for r in rows], "has_demographics": True,
    }, schema=USERS_SCHEMA)


@pytest.fixture(scope="module")
def splits(interactions):
    config = protocol_config_for("ml-1m", n_candidates=N)
    return build_task_splits(interactions, config, "ml-1m")


def replace_row(frame: pl.DataFrame, index: int, **values) -> pl.DataFrame:
    row = {**frame.row(index, named=True), **values}
    return pl.concat([frame[:index], pl.DataFrame([row], schema=frame.schema), frame[index + 1:]])


def failure(result: QualityResult, expectation: str) -> str:
    """The one failure line that names ``expectation``; the suite must have failed."""
    assert not result.success, str(result)
    lines = [f for f in result.failures if f.startswith(expectation)]
    assert lines, f"no failure for {expectation}:\n{result}"
    return lines[0]


def check_tasks(splits, tasks=None, train=None, all_interactions=None) -> QualityResult:
    return validate_tasks(
        splits.tasks if tasks is None else tasks,
        splits.train_interactions if train is None else train,
        all_interactions, N,
    )


# --------------------------------------------------------------------------- good data


def test_suites_pass_on_good_data(interactions, items, users, splits):
    results = [
        validate_interactions(interactions),
        validate_items(items),
        validate_users(users),
        validate_interactions(splits.train_interactions),
        check_tasks(splits, all_interactions=interactions),
    ]
    for result in results:
        assert result.success, str(result)
        assert result.failures == [] and result.evaluated >= 5
        assert result.statistics["unsuccessful_expectations"] == 0
    assert results[0].statistics["rows"] == interactions.height


# --------------------------------------------------------------------------- interactions


def test_rating_out_of_range(interactions):
    bad = replace_row(interactions, 5, rating=9.0)
    line = failure(validate_interactions(bad), "expect_column_values_to_be_between(rating, 1..5)")
    assert "1 unexpected values e.g. [9.0]" in line


def test_null_user_id(interactions):
    bad = replace_row(interactions, 7, user_id=None)
    failure(validate_interactions(bad), "expect_column_values_to_not_be_null(user_id)")


def test_duplicate_interaction(interactions):
    copy = interactions[10:11].with_columns(order=pl.lit(10**7, pl.Int64))
    bad = pl.concat([interactions, copy])
    line = failure(validate_interactions(bad),
                   "expect_compound_columns_to_be_unique(user_id, item_id, timestamp)")
    assert "2 unexpected values" in line


def test_missing_column(interactions):
    result = validate_interactions(interactions.drop("timestamp"))
    assert "expect_column_to_exist(timestamp): column is missing" in result.failures


# --------------------------------------------------------------------------- items, users


def test_duplicate_item_id(items):
    bad = pl.concat([items, items.head(1)])
    line = failure(validate_items(bad), "expect_column_values_to_be_unique(item_id)")
    assert "'1'" in line


def test_metadata_without_a_title(items):
    bad = replace_row(items, 2, title=None)
    line = failure(validate_items(bad), "expect_column_values_to_be_in_set(metadata_without_title")
    assert "1 unexpected values" in line and str(items["item_id"][2]) in line


def test_duplicate_user_and_unknown_gender(users):
    bad = replace_row(pl.concat([users, users.head(1)]), 3, gender="X")
    result = validate_users(bad)
    failure(result, "expect_column_values_to_be_unique(user_id)")
    assert "['X']" in failure(result, "expect_column_values_to_be_in_set(gender, in {M, F})")


# --------------------------------------------------------------------------- tasks


def first_eval(splits) -> int:
    return splits.tasks["split"].to_list().index("eval")


def unseen_item(interactions, user_id: str) -> str:
    seen = set(interactions.filter(pl.col("user_id") == user_id)["item_id"])
    return next(i for i in interactions["item_id"].unique().sort() if i not in seen)


def test_target_missing_from_candidates(interactions, splits):
    i = first_eval(splits)
    task = splits.tasks.row(i, named=True)
    candidates = list(task["candidate_item_ids"])
    candidates[task["target_position"]] = unseen_item(interactions, task["user_id"])
    bad = replace_row(splits.tasks, i, candidate_item_ids=candidates)
    result = check_tasks(splits, tasks=bad, all_interactions=interactions)
    line = failure(result, "expect_column_values_to_be_in_set(target_count_in_candidates, in {1})")
    assert task["task_id"] in line and "e.g. [0]" in line


def test_negative_in_user_history(interactions, splits):
    i = first_eval(splits)
    task = splits.tasks.row(i, named=True)
    candidates = list(task["candidate_item_ids"])
    negative = (task["target_position"] + 1) % N
    candidates[negative] = task["history_item_ids"][0]
    bad = replace_row(splits.tasks, i, candidate_item_ids=candidates)
    result = check_tasks(splits, tasks=bad, all_interactions=interactions)
    line = failure(result, "expect_column_values_to_be_in_set(negatives_in_user_history, in {0})")
    assert task["task_id"] in line


def test_duplicated_candidates(interactions, splits):
    task = splits.tasks.row(0, named=True)
    candidates = list(task["candidate_item_ids"])
    a, b = [k for k in range(N) if k != task["target_position"]][:2]
    candidates[b] = candidates[a]
    bad = replace_row(splits.tasks, 0, candidate_item_ids=candidates)
    line = failure(check_tasks(splits, tasks=bad, all_interactions=interactions),
                   f"expect_column_values_to_be_between(n_distinct_candidates, {N}..{N})")
    assert task["task_id"] in line and f"e.g. [{N - 1}]" in line


def test_leaked_target_in_train_interactions(interactions, splits):
    task = splits.tasks.row(first_eval(splits), named=True)
    leaked = interactions.filter(
        (pl.col("user_id") == task["user_id"]) & (pl.col("item_id") == task["target_item_id"])
        & (pl.col("timestamp") == task["target_timestamp"]))
    assert leaked.height == 1
    train = pl.concat([splits.train_interactions, leaked])
    result = check_tasks(splits, train=train, all_interactions=interactions)
    line = failure(result, "expect_column_values_to_be_in_set(leaked_target_rows, in {0})")
    assert task["task_id"] in line
    assert len(result.failures) == 1  # nothing else is wrong


def test_task_schema_and_keys(interactions, splits):
    result = check_tasks(splits, tasks=splits.tasks.drop("candidate_item_ids"),
                         all_interactions=interactions)
    assert result.failures == ["expect_column_to_exist(candidate_item_ids): column is missing"]
    duplicated = pl.concat([splits.tasks, splits.tasks.head(1)])
    result = check_tasks(splits, tasks=duplicated, all_interactions=interactions)
    failure(result, "expect_column_values_to_be_unique(task_id)")
    failure(result, "expect_column_values_to_be_unique(user_id)")
