"""Chronological order, user groups, user pools and the training-visible interactions.

- Each user's interactions are ordered by ``(timestamp, order)``: ``order`` (the row in the
  source file) breaks timestamp ties, which are common in ML-1M.
- Groups by total interactions: ``sparse``, ``dense``, ``other`` (in between, never
  sampled) and ``too_few`` (fewer than ``MIN_INTERACTIONS``, never sampled).
- Pools: per group, one seeded permutation of the users (sorted by id first); eval users
  are its head, then valid users, then train users. A larger pool only extends a smaller
  one, so the 10 smoke eval users are among the 100 demo eval users.
- Training-visible interactions: everything except each user's last two (validation and
  test targets). Users with fewer than ``MIN_INTERACTIONS`` keep all of theirs: they are
  nobody's target.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recthinker_dagster.protocol.config import MIN_INTERACTIONS, ProtocolConfig

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "order")
GROUPS = ("sparse", "dense")  # the sampled groups, in output order
SPLITS = ("train", "valid", "eval")  # in output order


def check_interactions(interactions: pl.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}; have {interactions.columns}")
    nulls = {c: n for c in REQUIRED_COLUMNS if (n := interactions[c].null_count())}
    if nulls:
        raise ValueError(f"interactions have nulls in key columns: {nulls}")


def chronological(interactions: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by (user_id, timestamp, order), plus ``_row`` (input row), ``_pos``
    (0-based position in the user's sequence) and ``_n`` (the user's total)."""
    return (
        interactions.with_row_index("_row")
        .sort(["user_id", "timestamp", "order"], maintain_order=True)
        .with_columns(
            _pos=pl.int_range(pl.len()).over("user_id"),
            _n=pl.len().over("user_id").cast(pl.Int64),
        )
    )


def training_visible(interactions: pl.DataFrame) -> pl.DataFrame:
    """All interactions minus each user's last two (users with < 3 keep all), input order."""
    ranked = chronological(interactions)
    keep = (pl.col("_n") < MIN_INTERACTIONS) | (pl.col("_pos") < pl.col("_n") - 2)
    return ranked.filter(keep).sort("_row").select(interactions.columns)


def assign_groups(interactions: pl.DataFrame, config: ProtocolConfig) -> pl.DataFrame:
    """One row per user: ``user_id``, ``n_interactions`` (Int32), ``group``; sorted by id."""
    n = pl.col("n_interactions")
    return (
        interactions.group_by("user_id")
        .agg(n_interactions=pl.len().cast(pl.Int32))
        .with_columns(
            group=pl.when(n < MIN_INTERACTIONS).then(pl.lit("too_few"))
            .when((n >= config.sparse_min) & (n <= config.sparse_max)).then(pl.lit("sparse"))
            .when(n >= config.dense_min).then(pl.lit("dense"))
            .otherwise(pl.lit("other"))
        )
        .sort("user_id")
    )


def group_sizes(interactions: pl.DataFrame, config: ProtocolConfig) -> dict[str, int]:
    """Number of users per group: ``sparse``, ``dense``, ``other``, ``too_few``."""
    counts = dict(assign_groups(interactions, config).group_by("group").len().iter_rows())
    return {g: int(counts.get(g, 0)) for g in ("sparse", "dense", "other", "too_few")}


def sample_user_pools(groups: pl.DataFrame, config: ProtocolConfig) -> pl.DataFrame:
    """Disjoint eval / valid / train users per group: ``user_id``, ``group``, ``split``.

    Pool sizes are capped by availability, filled in the order eval, valid, train.
    """
    sizes = {
        "eval": config.n_eval_users_per_group,
        "valid": config.n_valid_users_per_group,
        "train": config.n_train_users_per_group,
    }
    parts = []
    for index, group in enumerate(GROUPS):
        users = groups.filter(pl.col("group") == group)["user_id"].sort().to_numpy()
        rng = np.random.default_rng([config.seed, index])
        users = users[rng.permutation(len(users))]
        start = 0
        for split in ("eval", "valid", "train"):
            chosen = users[start : start + sizes[split]]
            start += len(chosen)
            parts.append(pl.DataFrame(
                {"user_id": chosen.tolist(), "group": group, "split": split},
                schema={"user_id": pl.Utf8, "group": pl.Utf8, "split": pl.Utf8},
            ))
    return pl.concat(parts)
