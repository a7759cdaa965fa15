"""Item-to-item relations from co-occurrence in users' index histories.

``count(i, j)`` = users who interacted with both; ``cosine(i, j) = count / sqrt(pop_i pop_j)``.
Each item keeps its top ``k`` neighbours by cosine (pairs seen together by fewer than
``min_count`` users are dropped), with the co-occurrence count of each edge.

Files: ``relations.npz`` (``item_ids``, ``neighbours`` (items x k, codes, -1 pad),
``cosine``, ``counts``, ``popularity``) and ``relations.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recthinker_dagster.tools.matrix import cosine_topk, user_item_matrix
from recthinker_dagster.tools.store import load_npz, prepare, read_json, save_npz, write_json


class ItemRelations:
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None):
        self.arrays = arrays
        self.meta = meta or {}
        self.item_ids: list[str] = arrays["item_ids"].tolist()
        self.index = {item: k for k, item in enumerate(self.item_ids)}

    @classmethod
    def build(cls, interactions: pl.DataFrame, *, k: int = 20, min_count: int = 2) -> ItemRelations:
        _, item_ids, matrix = user_item_matrix(interactions)
        items_users = matrix.T.tocsr()
        neighbours, cosine, counts = cosine_topk(items_users, matrix, k, min_count)
        arrays = {"item_ids": item_ids, "neighbours": neighbours, "cosine": cosine, "counts": counts,
                  "popularity": np.asarray(matrix.sum(axis=0)).ravel().astype(np.int32)}
        meta = {"k": k, "min_count": min_count, "n_items": len(item_ids),
                "n_interactions": interactions.height}
        return cls(arrays, meta)

    def save(self, folder: Path) -> None:
        folder = prepare(folder)
        save_npz(folder / "relations.npz", **self.arrays)
        write_json(folder / "relations.json", self.meta)

    @classmethod
    def load(cls, folder: Path) -> ItemRelations:
        folder = Path(folder)
        return cls(load_npz(folder / "relations.npz"), read_json(folder / "relations.json"))

    def related(self, item_id: str, limit: int) -> list[tuple[str, float, int]] | None:
        """``(item_id, cosine, count)`` best first; None when the item has no interactions."""
        k = self.index.get(item_id)
        if k is None:
            return None
        out: list[tuple[str, float, int]] = []
        for j, cos, count in zip(self.arrays["neighbours"][k], self.arrays["cosine"][k], self.arrays["counts"][k]):
            if j < 0 or len(out) >= limit:
                break
            out.append((self.item_ids[j], float(cos), int(count)))
        return out
