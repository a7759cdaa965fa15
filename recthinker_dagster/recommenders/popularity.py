"""Popularity baseline: how often each item occurs in the training interactions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl


class Popularity:
    """Score = the item's interaction count in ``fit``'s interactions (unknown items: 0,
    below every known item). Ignores the user and the history."""

    name = "popularity"

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def fit(self, interactions: pl.DataFrame) -> Popularity:
        counts = interactions.group_by("item_id").len().sort("item_id")
        self.counts = dict(zip(counts["item_id"].to_list(), counts["len"].cast(pl.Float64).to_list()))
        return self

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        return np.array([self.counts.get(item, 0.0) for item in candidates], dtype=np.float64)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        items = sorted(self.counts)
        np.savez(folder / "counts.npz", item_ids=np.array(items, dtype=str),
                 counts=np.array([self.counts[i] for i in items], dtype=np.float64))
        (folder / "config.json").write_text(json.dumps({"recommender": self.name}))

    @classmethod
    def load(cls, folder: Path) -> Popularity:
        with np.load(Path(folder) / "counts.npz", allow_pickle=False) as data:
            model = cls()
            model.counts = dict(zip(data["item_ids"].tolist(), data["counts"].tolist()))
        return model
