"""The one interface every classical recommender implements.

A recommender is fitted on training-visible interactions only and scores a task's
candidates given the user's history (so it works for users it never saw in training,
and never sees a task's target). Higher score = ranked higher.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl


class Recommender(Protocol):
    name: str

    def fit(self, interactions: pl.DataFrame) -> Recommender:
        """Train on interactions in the normalized schema (user_id, item_id, rating, timestamp, order)."""
        ...

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """One float per candidate, aligned with ``candidates``; unknown items get a finite low score."""
        ...

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path) -> Recommender: ...


def rank_by_scores(candidates: Sequence[str], scores: np.ndarray, seed: int = 0) -> list[str]:
    """Candidates sorted by descending score; ties broken by a seeded random order (never by position,
    which would leak the shuffled target position)."""
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(len(candidates))
    order = np.lexsort((tiebreak, -np.asarray(scores, dtype=np.float64)))
    return [candidates[i] for i in order]
