"""Random baseline: seeded scores that depend only on (seed, user, candidates)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl


class RandomRecommender:
    """Uniform random scores. The same (seed, user_id, candidates) always gives the same
    scores, in any process (the generator is seeded from a SHA-256 digest, not ``hash``)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def fit(self, interactions: pl.DataFrame) -> RandomRecommender:
        return self

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        key = "\x1f".join([str(self.seed), str(user_id), *map(str, candidates)]).encode()
        digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
        return np.random.default_rng(digest).random(len(candidates))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"recommender": self.name, "seed": self.seed}))

    @classmethod
    def load(cls, folder: Path) -> RandomRecommender:
        return cls(seed=json.loads((Path(folder) / "config.json").read_text())["seed"])
