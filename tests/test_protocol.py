"""The evaluation protocol's invariants, on hand-made frames, seeded random data and ML-1M."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.data.schema import INTERACTIONS_SCHEMA
from recthinker_dagster.protocol import (
    TASKS_SCHEMA,
    ProtocolConfig,
    assign_groups,
    build_task_splits,
    group_sizes,
    protocol_config_for,
)
from recthinker_dagster.settings import ProtocolSettings, load_profile
from tests.support.paths import require_shared

# --------------------------------------------------------------------------- data helpers


def read_ml1m_ratings() -> pl.DataFrame:
    """``UserID::MovieID::Rating::Timestamp`` lines; ``order`` is the line number."""
    path = require_shared("ml-1m", "ratings.dat.gz")
    raw = pl.read_csv(
        path, has_header=False, separator=":",  # "::" reads as ":" with empty columns between
        schema={"user_id": pl.Utf8, "_a": pl.Utf8, "item_id": pl.Utf8, "_b": pl.Utf8,
                "rating": pl.Float32, "_c": pl.Utf8, "timestamp": pl.Int64},
    )
    return raw.with_row_index("order").select(
        [pl.col(c).cast(t) for c, t in INTERACTIONS_SCHEMA.items()]
    )


def frame(rows: list[tuple]) -> pl.DataFrame:
    """Interactions from ``(user, item, timestamp, order)`` tuples; rating 4."""
    users, items, times, orders = zip(*rows)
    return pl.DataFrame(
        {"user_id": users, "item_id": items, "rating": [4.0] * len(rows),
         "timestamp": times, "order": orders},
        schema=INTERACTIONS_SCHEMA,
    )


def random_interactions(seed: int, n_users: int = 120, n_items: int = 150) -> pl.DataFrame:
    """Users with 0..80 distinct items, coarse timestamps (many ties), shuffled rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        length = int(rng.choice([1, 2, 3, 4, *rng.integers(5, 81, size=6)]))
        items = rng.choice(n_items, size=length, replace=False)
        times = 1_000 + rng.integers(0, 12, size=length) * 60  # few distinct values
        rows += [(f"u{u}", f"i{i}", int(t)) for i, t in zip(items, times)]
    order = rng.permutation(len(rows))  # source position, unrelated to time
    df = frame([(u, i, t, int(o)) for (u, i, t), o in zip(rows, order)])
    return df.sample(fraction=1.0, shuffle=True, seed=seed)  # row position means nothing


SMALL = dict(sparse_min=5, sparse_max=20, dense_min=40, n_candidates=10,
             n_eval_users_per_group=8, n_valid_users_per_group=5, n_train_users_per_group=10)


def expected_sequences(interactions: pl.DataFrame) -> dict[str, list[tuple]]:
    """Reference: each user's (item, timestamp) list sorted by (timestamp, order), in Python."""
    seqs: dict[str, list[tuple]] = {}
    for u, i, t, o in interactions.select("user_id", "item_id", "timestamp", "order").iter_rows():
        seqs.setdefault(u, []).append((t, o, i))
    return {u: [(i, t) for t, _, i in sorted(rows)] for u, rows in seqs.items()}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ml1m() -> pl.DataFrame:
    return read_ml1m_ratings()


@pytest.fixture(scope="module")
def ml1m_splits(ml1m):
    config = protocol_config_for("ml-1m", n_train_users_per_group=300)
    return build_task_splits(ml1m, config, "ml-1m")


@pytest.fixture(scope="module")
def random_cases():
    cases = []
    for seed in range(4):
        df = random_interactions(seed)
        cases.append((df, build_task_splits(df, ProtocolConfig(seed=seed, **SMALL), "synthetic")))
    return cases


def all_cases(ml1m, ml1m_splits, random_cases):
    return [(ml1m, ml1m_splits), *random_cases]


# --------------------------------------------------------------------------- config


def test_protocol_config_defaults_and_overrides():
    ml = protocol_config_for("ml-1m")
    assert (ml.sparse_min, ml.sparse_max, ml.dense_min) == (20, 50, 200)
    assert (ml.n_candidates, ml.seed, ml.prompt_history_len) == (10, 0, 10)  # the paper's 1 target + 9 negatives
    cds = protocol_config_for("amazon-cds", seed=3)
    assert (cds.sparse_min, cds.sparse_max, cds.dense_min, cds.seed) == (0, 25, 100, 3)
    assert protocol_config_for("synthetic").dense_min > protocol_config_for("synthetic").sparse_max
    assert ProtocolConfig.for_dataset("ml-1m", n_candidates=5).n_candidates == 5
    assert ml.to_dict()["n_candidates"] == 10
    with pytest.raises(ValueError, match="known"):
        protocol_config_for("netflix")
    with pytest.raises(ValueError):
        ProtocolConfig(sparse_min=10, sparse_max=60, dense_min=50)
    with pytest.raises(ValueError):
        ProtocolConfig(n_candidates=1)


# --------------------------------------------------------------------------- output shape


def test_output_schema_and_summary(ml1m, ml1m_splits):
    tasks = ml1m_splits.tasks
    assert dict(tasks.schema) == TASKS_SCHEMA
    assert ml1m_splits.train_interactions.schema == ml1m.schema
    assert tasks["task_id"].str.starts_with("ml-1m/").all()
    assert (tasks["task_id"] == "ml-1m/" + tasks["split"] + "/" + tasks["user_id"]).all()
    summary = ml1m_splits.summary()
    assert summary == {"train": {"sparse": 300, "dense": 300},
                       "valid": {"sparse": 50, "dense": 50},
                       "eval": {"sparse": 100, "dense": 100}}
    assert sum(sum(g.values()) for g in summary.values()) == tasks.height


def test_ml1m_group_sizes(ml1m):
    sizes = group_sizes(ml1m, protocol_config_for("ml-1m"))
    assert sizes == {"sparse": 924, "dense": 755, "other": 1320, "too_few": 0}


# --------------------------------------------------------------------------- invariants


def test_deterministic_by_seed(ml1m, random_cases):
    config = protocol_config_for("ml-1m")
    first, again = (build_task_splits(ml1m, config, "ml-1m") for _ in range(2))
    assert first.tasks.equals(again.tasks)
    assert first.train_interactions.equals(again.train_interactions)
    other = build_task_splits(ml1m, protocol_config_for("ml-1m", seed=1), "ml-1m")
    assert set(other.tasks["task_id"]) != set(first.tasks["task_id"])
    for df, splits in random_cases:
        rebuilt = build_task_splits(df, splits.config, "synthetic")
        assert rebuilt.tasks.equals(splits.tasks)
        # row order of the input does not matter, only (timestamp, order)
        shuffled = build_task_splits(df.reverse(), splits.config, "synthetic")
        assert shuffled.tasks.equals(splits.tasks)


def test_candidates_valid(ml1m, ml1m_splits, random_cases):
    for df, splits in all_cases(ml1m, ml1m_splits, random_cases):
        n = splits.config.n_candidates
        seen = df.group_by("user_id").agg(pl.col("item_id").unique().alias("seen"))
        seen = dict(seen.iter_rows())
        catalog = set(df["item_id"])
        for row in splits.tasks.iter_rows(named=True):
            candidates = row["candidate_item_ids"]
            assert len(candidates) == n and len(set(candidates)) == n
            assert candidates.count(row["target_item_id"]) == 1
            assert candidates[row["target_position"]] == row["target_item_id"]
            negatives = set(candidates) - {row["target_item_id"]}
            assert not negatives & set(seen[row["user_id"]]), row["task_id"]
            assert negatives <= catalog


def test_candidates_are_shuffled(ml1m_splits):
    positions = ml1m_splits.tasks["target_position"]
    assert positions.n_unique() == 10  # the target lands everywhere ...
    assert abs(positions.mean() - 4.5) < 1.0  # ... roughly uniformly


def test_targets_and_histories_match_reference(ml1m, ml1m_splits, random_cases):
    """Targets and histories equal an independent, pure-Python leave-last-out split."""
    for df, splits in all_cases(ml1m, ml1m_splits, random_cases):
        sequences = expected_sequences(df.join(splits.tasks.select("user_id"), on="user_id"))
        for row in splits.tasks.iter_rows(named=True):
            seq = sequences[row["user_id"]]
            index = {"eval": len(seq) - 1, "valid": len(seq) - 2, "train": len(seq) - 3}
            target = index[row["split"]]
            history_end = len(seq) - 3 if row["split"] == "train" else len(seq) - 2
            assert (row["target_item_id"], row["target_timestamp"]) == seq[target]
            assert row["history_item_ids"] == [i for i, _ in seq[:history_end]]
            assert row["history_length"] == history_end
            assert row["user_total_interactions"] == len(seq)
            # history strictly precedes the target in (timestamp, order) order
            assert all(t <= row["target_timestamp"] for _, t in seq[:history_end])


def test_no_heldout_target_in_train_interactions(ml1m, ml1m_splits, random_cases):
    keys = ["user_id", "item_id", "timestamp"]
    for df, splits in all_cases(ml1m, ml1m_splits, random_cases):
        heldout = splits.tasks.filter(pl.col("split") != "train").select(
            "user_id", item_id="target_item_id", timestamp="target_timestamp")
        assert heldout.join(splits.train_interactions, on=keys, how="semi").is_empty()
        # train targets are training-visible by design
        train = splits.tasks.filter(pl.col("split") == "train").select(
            "user_id", item_id="target_item_id", timestamp="target_timestamp")
        assert train.join(splits.train_interactions, on=keys, how="semi").height == train.height
        # training-visible = everything minus each user's last two (users with < 3 keep all)
        counts = df.group_by("user_id").len()
        expected = counts.select(pl.when(pl.col("len") < 3).then(pl.col("len"))
                                 .otherwise(pl.col("len") - 2).sum()).item()
        assert splits.train_interactions.height == expected


def test_user_pools_disjoint_and_capped(random_cases, ml1m):
    for _, splits in random_cases:
        tasks = splits.tasks
        assert tasks["user_id"].n_unique() == tasks.height  # one task per user at most
    # capping: ask for more users than exist; eval, then valid, then train are filled
    config = protocol_config_for("ml-1m", n_eval_users_per_group=900,
                                 n_valid_users_per_group=50, n_train_users_per_group=10_000)
    summary = build_task_splits(ml1m, config, "ml-1m").summary()
    assert summary["eval"] == {"sparse": 900, "dense": 755}
    assert summary["valid"] == {"sparse": 24, "dense": 0}
    assert summary["train"] == {"sparse": 0, "dense": 0}


def test_group_thresholds(ml1m, ml1m_splits, random_cases):
    for _, splits in [(ml1m, ml1m_splits), *random_cases]:
        c, tasks = splits.config, splits.tasks
        sparse = tasks.filter(pl.col("group") == "sparse")["user_total_interactions"]
        dense = tasks.filter(pl.col("group") == "dense")["user_total_interactions"]
        assert sparse.is_empty() or (sparse.min() >= max(c.sparse_min, 3)
                                     and sparse.max() <= c.sparse_max)
        assert dense.is_empty() or dense.min() >= c.dense_min
    # boundaries: 2 -> too_few, 3..5 sparse, 6 other, 7 dense
    rows = [(f"u{n}", f"i{k}", k, k) for n in (2, 3, 5, 6, 7) for k in range(n)]
    config = ProtocolConfig(sparse_min=0, sparse_max=5, dense_min=7)
    groups = dict(assign_groups(frame(rows), config).select("user_id", "group").iter_rows())
    assert groups == {"u2": "too_few", "u3": "sparse", "u5": "sparse", "u6": "other",
                      "u7": "dense"}
    assert group_sizes(frame(rows), config) == {"sparse": 2, "dense": 1, "other": 1,
                                                "too_few": 1}


def test_timestamp_ties_broken_by_order():
    # all at the same time; "order" (source line) says c < a < b, row position says otherwise
    rows = [("u", "a", 100, 5), ("u", "b", 100, 9), ("u", "c", 100, 1), ("u", "d", 50, 7)]
    rows += [("v", f"x{k}", k, k) for k in range(30)]  # catalog for negatives
    config = ProtocolConfig(sparse_min=3, sparse_max=4, dense_min=10, n_candidates=5,
                            n_eval_users_per_group=1, n_valid_users_per_group=0,
                            n_train_users_per_group=0)
    splits = build_task_splits(frame(rows), config, "synthetic")
    task = splits.tasks.row(0, named=True)
    assert (task["user_id"], task["split"]) == ("u", "eval")
    assert task["target_item_id"] == "b"  # latest by (timestamp, order)
    assert task["history_item_ids"] == ["d", "c"]  # "a" is the validation target, skipped
    train_u = splits.train_interactions.filter(pl.col("user_id") == "u")
    assert sorted(train_u["item_id"]) == ["c", "d"]


def test_users_with_few_interactions():
    rows = [("one", "a", 1, 0), ("two", "a", 1, 1), ("two", "b", 2, 2),
            ("three", "c", 3, 3), ("three", "d", 4, 4), ("three", "e", 5, 5)]
    rows += [("pad", f"x{k}", k, 10 + k) for k in range(30)]
    config = ProtocolConfig(sparse_min=0, sparse_max=5, dense_min=40, n_candidates=4,
                            n_eval_users_per_group=0, n_valid_users_per_group=0,
                            n_train_users_per_group=10)
    splits = build_task_splits(frame(rows), config, "synthetic")
    assert set(splits.tasks["user_id"]) == {"three"}  # "pad" is "other"
    task = splits.tasks.row(0, named=True)
    assert (task["target_item_id"], task["history_item_ids"]) == ("c", [])
    kept = splits.train_interactions
    assert kept.filter(pl.col("user_id").is_in(["one", "two"])).height == 3  # nobody's target
    assert kept.filter(pl.col("user_id") == "three")["item_id"].to_list() == ["c"]


def test_no_tasks_gives_empty_frame():
    rows = [("u", f"i{k}", k, k) for k in range(10)]
    config = ProtocolConfig(sparse_min=0, sparse_max=2, dense_min=50)
    splits = build_task_splits(frame(rows), config, "synthetic")
    assert splits.tasks.is_empty() and dict(splits.tasks.schema) == TASKS_SCHEMA
    assert splits.summary()["eval"] == {"sparse": 0, "dense": 0}
    assert splits.train_interactions.height == 8


def test_too_small_catalog_raises():
    rows = [("u", f"i{k}", k, k) for k in range(5)] + [("v", "z", 1, 99)]
    config = ProtocolConfig(sparse_min=3, sparse_max=5, dense_min=9, n_candidates=5)
    with pytest.raises(ValueError, match="unseen items"):
        build_task_splits(frame(rows), config, "synthetic")


def test_missing_columns_or_null_keys_raise():
    df = frame([("u", "a", 1, 0)])
    with pytest.raises(ValueError, match="order"):
        build_task_splits(df.drop("order"), ProtocolConfig(), "synthetic")
    with pytest.raises(ValueError, match="nulls"):
        build_task_splits(df.with_columns(user_id=pl.lit(None, pl.Utf8)), ProtocolConfig(),
                          "synthetic")


def test_twenty_candidates_change_only_the_candidates(ml1m, ml1m_splits):
    """N is the one knob of the candidate sets: users, targets, histories and the
    training-visible interactions are the same at 10 and 20 candidates."""
    twenty = build_task_splits(ml1m, replace(ml1m_splits.config, n_candidates=20), "ml-1m")
    assert twenty.tasks["candidate_item_ids"].list.len().unique().to_list() == [20]
    same = [c for c in TASKS_SCHEMA if c not in ("candidate_item_ids", "target_position")]
    assert twenty.tasks.select(same).equals(ml1m_splits.tasks.select(same))
    assert twenty.train_interactions.equals(ml1m_splits.train_interactions)


@pytest.mark.parametrize("profile", ["smoke", "demo", "full"])
def test_every_profile_uses_ten_candidates_and_twenty_stays_available(profile):
    assert ProtocolSettings().n_candidates == 10
    assert load_profile(profile).protocol.for_dataset("ml-1m").n_candidates == 10
    overridden = load_profile(profile, {"protocol.n_candidates": 20})  # --set protocol.n_candidates=20
    assert overridden.protocol.for_dataset("amazon-cds").n_candidates == 20


def test_smaller_runs_nest_in_larger_ones(ml1m):
    smoke = build_task_splits(ml1m, protocol_config_for(
        "ml-1m", n_eval_users_per_group=10, n_valid_users_per_group=0,
        n_train_users_per_group=0), "ml-1m").tasks
    demo = build_task_splits(ml1m, protocol_config_for("ml-1m"), "ml-1m").tasks
    joined = smoke.join(demo, on="task_id", how="inner", suffix="_demo")
    assert joined.height == smoke.height == 20  # same users, same task ids
    assert (joined["candidate_item_ids"] == joined["candidate_item_ids_demo"]).all()


def test_sample_sizes_are_capped_by_the_population(ml1m):
    config = protocol_config_for("ml-1m", n_eval_users_per_group=1000,
                                 n_valid_users_per_group=0, n_train_users_per_group=0)
    splits = build_task_splits(ml1m, config, "ml-1m")
    assert splits.tasks.height == 924 + 755


def test_domain_code_knows_no_orchestrator(repo_root):
    code = ("import sys, recthinker_dagster.protocol, recthinker_dagster.quality; "
            "print(sorted(m for m in ('dagster', 'mlflow', 'dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=repo_root)
    assert out.stdout.strip() == "[]"
    for package in ("protocol", "quality"):
        for path in (repo_root / "recthinker_dagster" / package).glob("*.py"):
            text = path.read_text()
            for name in ("dagster", "mlflow", "dvc"):
                assert f"import {name}" not in text and f"from {name}" not in text, path
