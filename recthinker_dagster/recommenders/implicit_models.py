"""The maintained library baselines: BPR, ALS and item-item cosine kNN from ``implicit``.

``ImplicitRecommender(kind, **params)`` wraps one ``implicit`` CPU model behind the
``Recommender`` protocol (``recommenders/base.py``), so the benchmark and the evaluation can
put the library next to the hand-written models on the same tasks:

=============== ================================================================ ===========
kind            model                                                            default
=============== ================================================================ ===========
``bpr``         ``implicit.cpu.bpr.BayesianPersonalizedRanking`` (item bias incl.) 64 factors
``als``         ``implicit.cpu.als.AlternatingLeastSquares`` (confidence 1+alpha)    64 factors
``itemknn``     ``implicit.nearest_neighbours.CosineRecommender``                  K = 100
=============== ================================================================ ===========

Trained on the binary user x item matrix of the interactions (duplicates count once; the
library's BPR would ignore weights anyway), one thread, ``random_state = seed``: the same
seed gives the same model. Defaults (BPR: learning rate 0.05; ALS: alpha 10; kNN: K 100)
were picked on the ML-1M and Amazon CDs validation tasks, never the eval tasks. Scores: the learned user
vector for a training user, else the mean of the history items' vectors (kNN: the summed
similarity of the candidate to the history items). Items never seen in training score
``UNKNOWN_SCORE``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

UNKNOWN_SCORE = -1e6  # finite, below any learned score
KINDS = ("bpr", "als", "itemknn")
DEFAULTS: dict[str, dict[str, Any]] = {
    "bpr": {"factors": 64, "learning_rate": 0.05, "regularization": 0.01, "iterations": 100},
    "als": {"factors": 64, "regularization": 0.05, "alpha": 10.0, "iterations": 15},
    "itemknn": {"K": 100},
}


def user_item_matrix(interactions: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Sorted user ids, sorted item ids and the binary users x items CSR matrix."""
    pairs = interactions.select("user_id", "item_id").unique()
    user_ids = np.sort(pairs["user_id"].unique().to_numpy()).astype(str)
    item_ids = np.sort(pairs["item_id"].unique().to_numpy()).astype(str)
    users = pl.Series(user_ids).to_frame("user_id").with_row_index("u")
    items = pl.Series(item_ids).to_frame("item_id").with_row_index("i")
    coded = pairs.join(users, on="user_id").join(items, on="item_id")
    matrix = sp.csr_matrix(
        (np.ones(coded.height, np.float32), (coded["u"].to_numpy(), coded["i"].to_numpy())),
        shape=(len(user_ids), len(item_ids)))
    return user_ids, item_ids, matrix


def model_class(kind: str) -> Any:
    """The CPU ``implicit`` class of ``kind`` (imported here: the package is only needed to train)."""
    if kind == "bpr":
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        return BayesianPersonalizedRanking
    if kind == "als":
        from implicit.cpu.als import AlternatingLeastSquares
        return AlternatingLeastSquares
    from implicit.nearest_neighbours import CosineRecommender
    return CosineRecommender


class ImplicitRecommender:
    """One ``implicit`` model as a ``Recommender`` (see the module docstring)."""

    def __init__(self, kind: str = "bpr", seed: int = 0, **params: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown implicit model kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.seed = kind, seed
        self.params = {**DEFAULTS[kind], **params}
        self.name = f"implicit_{kind}"
        self.train_seconds = 0.0
        self.user_ids = np.array([], dtype=str)
        self.item_ids = np.array([], dtype=str)
        self.arrays: dict[str, np.ndarray] = {}  # user_factors/item_factors, or the kNN similarity CSR
        self._index()

    def _index(self) -> None:
        self._user_index = {u: k for k, u in enumerate(self.user_ids.tolist())}
        self._item_index = {i: k for k, i in enumerate(self.item_ids.tolist())}
        if self.kind == "itemknn" and "data" in self.arrays:
            a = self.arrays
            self._similarity = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=tuple(a["shape"]))

    def fit(self, interactions: pl.DataFrame) -> ImplicitRecommender:
        import time

        from threadpoolctl import threadpool_limits

        started = time.perf_counter()
        self.user_ids, self.item_ids, matrix = user_item_matrix(interactions)
        cls = model_class(self.kind)  # imported before the limit below, which covers loaded libraries only
        seeded = {} if self.kind == "itemknn" else {"random_state": self.seed}
        # implicit asks for one BLAS thread (ALS checks at construction); one thread is also deterministic
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Method expects CSR input")  # kNN's own COO step
            model = cls(num_threads=1, **seeded, **self.params)
            model.fit(matrix, show_progress=False)
        if self.kind == "itemknn":
            similarity = model.similarity.tocsr().astype(np.float32)
            self.arrays = {"data": similarity.data, "indices": similarity.indices, "indptr": similarity.indptr,
                           "shape": np.array(similarity.shape)}
        else:
            self.arrays = {"user_factors": np.asarray(model.user_factors, np.float32),
                           "item_factors": np.asarray(model.item_factors, np.float32)}
        self._index()
        self.train_seconds = time.perf_counter() - started
        return self

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        codes = [self._item_index.get(c) for c in candidates]
        known = np.array([c is not None for c in codes], dtype=bool)
        scores = np.full(len(candidates), UNKNOWN_SCORE, dtype=np.float64)
        if not known.any():
            return scores
        idx = np.array([c for c in codes if c is not None])
        seen = [c for c in (self._item_index.get(i) for i in history) if c is not None]
        if self.kind == "itemknn":
            scores[known] = np.asarray(self._similarity[seen][:, idx].sum(axis=0)).ravel() if seen else 0.0
            return scores
        items = self.arrays["item_factors"]
        k = self._user_index.get(user_id)
        if k is not None:
            vector = self.arrays["user_factors"][k]
        elif seen:
            vector = items[seen].mean(axis=0)
            if self.kind == "bpr":
                vector[-1] = 1.0  # implicit's BPR keeps the item bias as a last factor, times a user 1
        else:
            vector = np.zeros(items.shape[1], np.float32)
        scores[known] = items[idx] @ vector
        return scores

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"user_ids": self.user_ids, "item_ids": self.item_ids, **self.arrays}
        np.savez(folder / "implicit.npz", **arrays)
        meta = {"name": self.name, "kind": self.kind, "seed": self.seed, "params": self.params,
                "train_seconds": self.train_seconds}
        (folder / "implicit.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ImplicitRecommender:
        folder = Path(folder)
        meta = json.loads((folder / "implicit.json").read_text())
        model = cls(meta["kind"], seed=meta["seed"], **meta["params"])
        with np.load(folder / "implicit.npz", allow_pickle=False) as data:
            model.user_ids, model.item_ids = data["user_ids"], data["item_ids"]
            model.arrays = {k: data[k] for k in data.files if k not in ("user_ids", "item_ids")}
        model.train_seconds = meta.get("train_seconds", 0.0)
        model._index()
        return model
