"""A seeded synthetic dataset with real collaborative structure, for tests and smoke runs.

Items have a primary genre (sometimes a second one) and a popularity; users have a genre
taste. An item is chosen with probability rising with taste x genre affinity and
popularity (Gumbel top-k, without replacement), and its rating rises with the same
affinity, so both collaborative filtering and content (genre, creator) carry signal.
History lengths are log-uniform in ``[min_history, max_history]``, so short and long users
both exist; each user's timestamps strictly increase. A ``missing_metadata`` share of the
items only get placeholder rows (``has_metadata`` False), like the Amazon data.
Ids are ``"u1".."uN"`` and ``"i1".."iM"``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recthinker_dagster.data.movielens import OCCUPATIONS
from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Dataset,
    conform,
)

GENRES = ["Rock", "Jazz", "Pop", "Classical", "Hip Hop", "Country", "Electronic", "Blues",
          "Folk", "Metal", "Reggae", "Soul"]
ADJECTIVES = ["Silent", "Golden", "Electric", "Broken", "Midnight", "Velvet", "Northern",
              "Paper", "Crimson", "Distant", "Wild", "Hollow", "Bright", "Lonely", "Secret",
              "Endless", "Frozen", "Burning", "Gentle", "Restless"]
NOUNS = ["River", "Horizon", "Garden", "Machine", "Echo", "Harbor", "Mirror", "Season",
         "Highway", "Lantern", "Ocean", "Canyon", "Station", "Letters", "Skyline", "Dreams",
         "Shadows", "Fields", "Avenue", "Signals"]
START = 1_420_070_400  # 2015-01-01 UTC
DAY = 86_400


def _titles(rng: np.random.Generator, n_items: int) -> list[str]:
    combos = rng.permutation(len(ADJECTIVES) * len(NOUNS))
    titles = []
    for i in range(n_items):
        c = int(combos[i % len(combos)])
        suffix = f" {i // len(combos) + 1}" if i >= len(combos) else ""
        titles.append(f"{ADJECTIVES[c // len(NOUNS)]} {NOUNS[c % len(NOUNS)]}{suffix}")
    return titles


def _items(rng, n_items, genres, primary, secondary, missing_metadata) -> pl.DataFrame:
    creator_ids = primary * 5 + rng.integers(0, 5, n_items)
    creators = [f"{genres[c // 5]} Artist {c % 5 + 1}" for c in creator_ids]
    cats = [[genres[p]] + ([genres[s]] if s >= 0 else []) for p, s in zip(primary, secondary)]
    has_meta = rng.random(n_items) >= missing_metadata
    frame = pl.DataFrame(
        {
            "item_id": [f"i{j + 1}" for j in range(n_items)],
            "title": _titles(rng, n_items),
            "year": rng.integers(1960, 2021, n_items),
            "categories": cats,
            "creator": creators,
            "description": [f"A {' / '.join(c).lower()} album by {a}." for c, a in
                            zip(cats, creators)],
            "has_metadata": has_meta,
        }
    )
    blank = {c: pl.when(pl.col("has_metadata")).then(pl.col(c)) for c in
             ("title", "year", "creator", "description")}
    frame = frame.with_columns(
        **blank,
        categories=pl.when(pl.col("has_metadata")).then(pl.col("categories"))
        .otherwise(pl.lit([], pl.List(pl.Utf8))),
    )
    return conform(frame, ITEMS_SCHEMA)


def _users(rng, n_users) -> pl.DataFrame:
    ages = np.array([1, 18, 25, 35, 45, 50, 56])
    frame = pl.DataFrame(
        {
            "user_id": [f"u{i + 1}" for i in range(n_users)],
            "gender": rng.choice(["M", "F"], n_users).tolist(),
            "age": ages[rng.integers(0, len(ages), n_users)],
            "occupation": [OCCUPATIONS[int(k)] for k in rng.integers(0, 21, n_users)],
            "zip_code": [f"{z:05d}" for z in rng.integers(0, 100_000, n_users)],
            "has_demographics": True,
        }
    )
    return conform(frame, USERS_SCHEMA)


def generate_synthetic(
    n_users: int = 300,
    n_items: int = 500,
    seed: int = 0,
    *,
    n_genres: int = 8,
    min_history: int = 20,
    max_history: int | None = None,
    missing_metadata: float = 0.1,
    name: str = "synthetic",
) -> Dataset:
    """Generate a dataset (see module docstring). ``max_history`` defaults to 60% of items."""
    rng = np.random.default_rng(seed)
    genres = GENRES[:n_genres] + [f"Genre {g + 1}" for g in range(len(GENRES), n_genres)]
    max_history = min(max_history or int(0.6 * n_items), n_items - 1)
    min_history = min(min_history, max_history)

    # Item factors: primary genre, an optional second genre, noise; Zipf-like popularity.
    primary = rng.integers(0, n_genres, n_items)
    secondary = np.where(rng.random(n_items) < 0.35, rng.integers(0, n_genres, n_items), -1)
    secondary = np.where(secondary == primary, -1, secondary)
    item_vec = np.eye(n_genres)[primary] + 0.5 * (secondary[:, None] == np.arange(n_genres))
    item_vec += 0.15 * rng.standard_normal((n_items, n_genres))
    popularity = -0.8 * np.log(rng.permutation(n_items) + 1.0)

    # User taste: a sparse Dirichlet over genres; affinity drives choice and rating.
    taste = rng.dirichlet(np.full(n_genres, 0.3), n_users)
    affinity = 6.0 * taste @ item_vec.T
    utility = affinity + popularity + rng.gumbel(size=(n_users, n_items))
    lengths = np.exp(rng.uniform(np.log(min_history), np.log(max_history + 1), n_users))
    lengths = np.clip(lengths.astype(int), min_history, max_history)
    top = np.argpartition(-utility, max_history - 1, axis=1)[:, :max_history]
    ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(utility, top, 1), 1), 1)
    take = np.arange(max_history)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(n_users), lengths)
    items = ranked[take]

    # Consumption order is random within a user; timestamps strictly increase.
    shuffle = np.lexsort((rng.random(len(users)), users))
    users, items = users[shuffle], items[shuffle]
    gaps = rng.exponential(DAY, len(users)).astype(np.int64) + 1
    first = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    gaps[first] = START + rng.integers(0, 730 * DAY, n_users)
    starts = np.repeat(np.cumsum(gaps)[first] - gaps[first], lengths)
    timestamps = np.cumsum(gaps) - starts

    z = affinity[users, items]
    z = (z - z.mean()) / (z.std() + 1e-9)
    ratings = np.clip(np.rint(3.6 + 1.1 * z + 0.7 * rng.standard_normal(len(z))), 1, 5)
    interactions = pl.DataFrame(
        {
            "user_id": users + 1,
            "item_id": items + 1,
            "rating": ratings,
            "timestamp": timestamps,
            "order": np.arange(len(users)),
        }
    ).with_columns(user_id=pl.format("u{}", "user_id"), item_id=pl.format("i{}", "item_id"))
    return Dataset(
        name=name,
        interactions=conform(interactions, INTERACTIONS_SCHEMA),
        items=_items(rng, n_items, genres, primary, secondary, missing_metadata),
        users=_users(rng, n_users),
        source={"format": "synthetic", "seed": str(seed), "n_users": str(n_users),
                "n_items": str(n_items)},
    )
