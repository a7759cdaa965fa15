"""Nearest users by cosine over binary index-interaction vectors, and what they liked.

For each user: the top ``k`` other users by ``overlap / sqrt(n_u n_v)`` with the overlap
count, plus up to ``n_liked`` "liked" items (rated 4-5, most recent first; when no rating
is known, the most recent items). A user absent from the index (or whose history differs
from the index) is folded in from the given history.

Files: ``similar_users.npz`` (``user_ids``, ``item_ids``, ``indptr``/``indices`` (users x
items CSR), ``neighbours``/``similarity``/``overlap`` (users x k, -1 pad),
``liked_indptr``/``liked_items``/``liked_ratings``) and ``similar_users.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recthinker_dagster.tools.matrix import cosine_topk, user_item_matrix
from recthinker_dagster.tools.store import load_npz, prepare, read_json, save_npz, write_json

LIKED_MIN_RATING = 4.0


class SimilarUsers:
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None):
        self.arrays = arrays
        self.meta = meta or {}
        self.user_ids: list[str] = arrays["user_ids"].tolist()
        self.item_ids: list[str] = arrays["item_ids"].tolist()
        self.user_index = {u: k for k, u in enumerate(self.user_ids)}
        self.item_index = {i: k for k, i in enumerate(self.item_ids)}
        self.indptr, self.indices = arrays["indptr"], arrays["indices"]
        self.matrix = sp.csr_matrix((np.ones(len(self.indices), np.float32), self.indices, self.indptr),
                                    shape=(len(self.user_ids), len(self.item_ids)))
        self.sizes = np.diff(self.indptr)

    @classmethod
    def build(cls, interactions: pl.DataFrame, *, k: int = 20, n_liked: int = 10) -> SimilarUsers:
        user_ids, item_ids, matrix = user_item_matrix(interactions)
        neighbours, similarity, overlap = cosine_topk(matrix, matrix.T.tocsr(), k)
        liked_indptr, liked_items, liked_ratings = _liked(interactions, user_ids, item_ids, n_liked)
        arrays = {"user_ids": user_ids, "item_ids": item_ids,
                  "indptr": matrix.indptr.astype(np.int64), "indices": matrix.indices.astype(np.int32),
                  "neighbours": neighbours, "similarity": similarity, "overlap": overlap,
                  "liked_indptr": liked_indptr, "liked_items": liked_items, "liked_ratings": liked_ratings}
        meta = {"k": k, "n_liked": n_liked, "n_users": len(user_ids), "n_items": len(item_ids),
                "n_interactions": interactions.height}
        return cls(arrays, meta)

    def save(self, folder: Path) -> None:
        folder = prepare(folder)
        save_npz(folder / "similar_users.npz", **self.arrays)
        write_json(folder / "similar_users.json", self.meta)

    @classmethod
    def load(cls, folder: Path) -> SimilarUsers:
        folder = Path(folder)
        return cls(load_npz(folder / "similar_users.npz"), read_json(folder / "similar_users.json"))

    # ---------------------------------------------------------------- queries
    def items_of(self, user_id: str) -> list[str]:
        k = self.user_index.get(user_id)
        if k is None:
            return []
        return [self.item_ids[j] for j in self.indices[self.indptr[k] : self.indptr[k + 1]]]

    def row_codes(self, k: int) -> np.ndarray:
        return self.indices[self.indptr[k] : self.indptr[k + 1]]

    def neighbours(self, user_id: str, history: Sequence[str], limit: int) -> list[tuple[int, float, int]]:
        """``(user code, cosine, overlap)`` best first. Uses the precomputed list when the
        index row of ``user_id`` holds exactly ``history``'s items, else folds ``history`` in."""
        k = self.user_index.get(user_id)
        distinct = set(history)
        if k is not None and self.sizes[k] == len(distinct) and limit <= self.neighbours_k:
            out: list[tuple[int, float, int]] = []
            a = self.arrays
            for v, sim, ov in zip(a["neighbours"][k], a["similarity"][k], a["overlap"][k]):
                if v < 0 or len(out) >= limit:
                    break
                out.append((int(v), float(sim), int(ov)))
            return out
        return self.fold_in(distinct, limit, exclude=k)

    @property
    def neighbours_k(self) -> int:
        return self.arrays["neighbours"].shape[1]

    def fold_in(self, items: set[str], limit: int, exclude: int | None = None) -> list[tuple[int, float, int]]:
        codes = [self.item_index[i] for i in items if i in self.item_index]
        if not codes:
            return []
        vector = np.zeros(len(self.item_ids), np.float32)
        vector[codes] = 1.0
        overlap = self.matrix @ vector
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(overlap > 0, overlap / np.sqrt(self.sizes * len(codes)), 0.0)
        if exclude is not None:
            cos[exclude] = 0.0
        top = np.flatnonzero(cos > 0)
        top = top[np.lexsort((top, -overlap[top], -cos[top]))][:limit]
        return [(int(v), float(cos[v]), int(overlap[v])) for v in top]

    def liked(self, user_code: int) -> list[tuple[str, float]]:
        s, e = self.arrays["liked_indptr"][user_code], self.arrays["liked_indptr"][user_code + 1]
        return [(self.item_ids[j], float(r)) for j, r in
                zip(self.arrays["liked_items"][s:e], self.arrays["liked_ratings"][s:e])]


def _liked(interactions: pl.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray, n_liked: int):
    frame = interactions.select(
        "user_id", "item_id", "timestamp",
        rating=pl.col("rating") if "rating" in interactions.columns else pl.lit(None, pl.Float32),
    )
    has_rating = pl.col("rating").is_not_null().any().over("user_id")
    liked = (
        frame.filter(~has_rating | (pl.col("rating") >= LIKED_MIN_RATING))
        .sort(["user_id", "timestamp", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True).head(n_liked)
    )
    users = np.searchsorted(user_ids, liked["user_id"].to_numpy().astype(str))
    indptr = np.searchsorted(users, np.arange(len(user_ids) + 1)).astype(np.int64)
    items = np.searchsorted(item_ids, liked["item_id"].to_numpy().astype(str)).astype(np.int32)
    ratings = liked["rating"].fill_null(np.nan).to_numpy().astype(np.float32)
    return indptr, items, ratings
