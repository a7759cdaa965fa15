"""Item-based k-nearest-neighbours with shrunk cosine similarity (Sarwar et al. 2001).

``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) * sqrt(|U_j|) + shrink)`` over the binary
user-item matrix of the training interactions (``U_i``: users who interacted with ``i``),
``sim(i, i) = 0``. With ``neighbors = k`` each item keeps only its ``k`` most similar items.

``score(c) = sum_h w_h * sim(c, h)`` over the last ``history_window`` known history items
(most recent weight 1, the one before ``recency_decay``, then ``recency_decay**2``, ...;
``recency_decay = 1`` weighs them all equally), plus ``popularity_tiebreak * pop(c) /
max pop``, a tiny term that orders candidates without any similarity by popularity.
Unknown candidates score -1, below every known item.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

UNKNOWN_SCORE = -1.0


def cosine_topk(matrix: sp.csr_matrix, shrink: float, neighbors: int | None,
                block: int = 1024) -> sp.csr_matrix:
    """Item-item shrunk cosine of a binary users x items matrix, each row cut to its
    ``neighbors`` largest entries (all when None); computed in row blocks."""
    items = matrix.T.tocsr().astype(np.float32)
    norms = np.sqrt(np.asarray(items.sum(axis=1)).ravel())
    n = items.shape[0]
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = (items[start:stop] @ items.T).toarray()
        sim /= norms[start:stop, None] * norms[None, :] + shrink + 1e-12
        sim[np.arange(stop - start), np.arange(start, stop)] = 0.0
        if neighbors is not None and neighbors < n:
            keep = np.argpartition(-sim, neighbors - 1, axis=1)[:, :neighbors]
            values = np.take_along_axis(sim, keep, axis=1)
        else:
            keep = np.broadcast_to(np.arange(n), sim.shape)
            values = sim
        nonzero = values > 0
        rows.append(np.nonzero(nonzero)[0] + start)
        cols.append(keep[nonzero])
        vals.append(values[nonzero])
    data = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    return sp.csr_matrix(
        (data, (np.concatenate(rows) if rows else [], np.concatenate(cols) if cols else [])),
        shape=(n, n), dtype=np.float32)


class ItemKNN:
    """Item-item collaborative filtering (see the module docstring for the formulas)."""

    name = "itemknn"

    def __init__(self, neighbors: int | None = 100, shrink: float = 10.0,
                 history_window: int | None = 50, recency_decay: float = 1.0,
                 popularity_tiebreak: float = 1e-6) -> None:
        self.neighbors = neighbors
        self.shrink = float(shrink)
        self.history_window = history_window
        self.recency_decay = float(recency_decay)
        self.popularity_tiebreak = float(popularity_tiebreak)
        self.item_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.similarity = sp.csr_matrix((0, 0), dtype=np.float32)
        self.popularity = np.zeros(0)

    def params(self) -> dict:
        return {"neighbors": self.neighbors, "shrink": self.shrink,
                "history_window": self.history_window, "recency_decay": self.recency_decay,
                "popularity_tiebreak": self.popularity_tiebreak}

    def fit(self, interactions: pl.DataFrame) -> ItemKNN:
        self._set_items(interactions["item_id"].unique().sort().to_list())
        users = interactions["user_id"].unique().sort().to_list()
        user_index = {u: i for i, u in enumerate(users)}
        pairs = interactions.select("user_id", "item_id").unique()
        rows = np.fromiter((user_index[u] for u in pairs["user_id"]), np.int64, pairs.height)
        cols = np.fromiter((self.index[i] for i in pairs["item_id"]), np.int64, pairs.height)
        matrix = sp.csr_matrix((np.ones(pairs.height, np.float32), (rows, cols)),
                               shape=(len(users), len(self.item_ids)))
        self.similarity = cosine_topk(matrix, self.shrink, self.neighbors)
        counts = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float64)
        self.popularity = counts / counts.max() if counts.size else counts
        return self

    def _set_items(self, item_ids: list[str]) -> None:
        self.item_ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        known = [self.index[h] for h in history if h in self.index]
        if self.history_window is not None:
            known = known[-self.history_window:] if self.history_window > 0 else []
        weights = np.zeros(len(self.item_ids))
        # most recent item weight 1, then decay**1, decay**2, ... (repeats add up)
        np.add.at(weights, known, self.recency_decay ** np.arange(len(known))[::-1])
        cand = np.array([self.index.get(c, -1) for c in candidates], dtype=np.int64)
        scores = np.full(len(candidates), UNKNOWN_SCORE)
        hit = cand >= 0
        if hit.any():
            scores[hit] = (self.similarity[cand[hit]] @ weights
                           + self.popularity_tiebreak * self.popularity[cand[hit]])
        return scores

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sim = self.similarity.tocsr()
        np.savez(folder / "model.npz", item_ids=np.array(self.item_ids, dtype=str),
                 data=sim.data, indices=sim.indices, indptr=sim.indptr,
                 popularity=self.popularity)
        (folder / "config.json").write_text(json.dumps({"recommender": self.name, **self.params()}))

    @classmethod
    def load(cls, folder: Path) -> ItemKNN:
        config = json.loads((Path(folder) / "config.json").read_text())
        config.pop("recommender", None)
        model = cls(**config)
        with np.load(Path(folder) / "model.npz", allow_pickle=False) as data:
            model._set_items(data["item_ids"].tolist())
            n = len(model.item_ids)
            model.similarity = sp.csr_matrix((data["data"], data["indices"], data["indptr"]),
                                             shape=(n, n))
            model.popularity = data["popularity"]
        return model
