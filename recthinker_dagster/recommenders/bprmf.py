"""BPR matrix factorization (Rendle et al., 2009) in torch: the CF model behind the tools.

``x(u, i) = p_u . q_i + b_i``, trained to rank an observed ``(u, i)`` above a uniformly
sampled item ``j`` the user has not interacted with (``-log sigmoid(x_ui - x_uj)`` plus L2),
with Adam on minibatches.

Which positives it trains on most (``recency``): each observed pair is drawn with weight
``exp(-k / recency)``, ``k`` = how many of the user's interactions are more recent (0 for the
last one; order: ``timestamp``, then ``order``, when the frame has them). A user's recent
items then shape its vector most, and every user gets about the same share of updates
whatever its history length; both matter for the protocol's leave-last-out targets.
``recency = 0`` is classical BPR (each pair once per epoch, shuffled). An epoch is
``max(n_pairs, epoch_samples)`` draws: Adam progresses per step, so a small dataset gets
as many steps as a large one. Defaults were tuned on the ML-1M and Amazon CDs *validation*
tasks, 400 users per group (``scripts/benchmark_baselines.py --set
protocol.n_valid_users_per_group=400 --split valid`` prints them, old defaults and the
``implicit`` library's BPR alongside); eval tasks were never used.

Seeded end to end: ``torch.manual_seed`` and one ``torch.Generator`` drive the initial
factors, the positives drawn and the negatives, so a seed gives the same model every time
(on the same torch build and thread count).

``score`` uses the user's learned vector when the user was in training, else folds the user
in as the mean of the history items' vectors (a user with no known history gets the item
biases, i.e. a popularity ranking). Items never seen in training get ``UNKNOWN_SCORE``.

Files written by ``save(folder)``: ``bprmf.npz`` (``user_factors``, ``item_factors``,
``item_bias``, ``user_ids``, ``item_ids``, ``train_indptr``/``train_items``: the exact
training pairs as a user-major CSR, kept so leakage checks can audit them) and
``bprmf.json`` (hyperparameters, per-epoch losses, validation metrics).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recthinker_dagster.metrics import mean_metrics, task_metrics
from recthinker_dagster.recommenders.base import rank_by_scores

UNKNOWN_SCORE = -1e6  # finite, below any learned score


@dataclass(frozen=True)
class BPRConfig:
    dim: int = 64
    epochs: int = 10
    lr: float = 0.02  # Adam
    reg: float = 1e-2  # L2 on the factors and biases of each batch, per example
    batch_size: int = 8192
    seed: int = 0
    num_threads: int = 1  # torch threads while training; small ops run best on one (0: torch default)
    recency: float = 10.0  # positives drawn with weight exp(-k / recency), k: more recent items (0: uniform)
    epoch_samples: int = 500_000  # an epoch draws max(n_pairs, epoch_samples) positives (0: n_pairs)

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BPRConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "reg", "recency", "epoch_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"BPRConfig.{name} must be >= 0, got {getattr(self, name)}")


# How models saved before ``recency`` and ``epoch_samples`` existed were trained.
LEGACY_CONFIG: dict[str, float | int] = {"recency": 0.0, "epoch_samples": 0}
# The defaults before they were tuned (6 epochs, L2 1e-5, classical uniform positives), kept
# so the benchmark can show old and new side by side.
UNTUNED_CONFIG = BPRConfig(epochs=6, reg=1e-5, recency=0.0, epoch_samples=0)


@dataclass(eq=False)
class BPRMF:
    """BPR-MF recommender (the ``Recommender`` protocol of ``recommenders/base.py``)."""

    config: BPRConfig = field(default_factory=BPRConfig)
    name: str = "bprmf"
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    validation_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    user_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    item_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    user_factors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    item_factors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    item_bias: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    train_indptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    train_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self._user_index = {u: k for k, u in enumerate(self.user_ids.tolist())}
        self._item_index = {i: k for k, i in enumerate(self.item_ids.tolist())}

    # ------------------------------------------------------------------ training
    def fit(self, interactions: pl.DataFrame) -> BPRMF:
        """Train on ``interactions`` (needs ``user_id``, ``item_id``; duplicates count once, at
        their most recent position; ``timestamp`` and ``order``, when present, give the order)."""
        cfg = self.config
        started = time.perf_counter()
        pairs = training_pairs(interactions)
        self.user_ids = np.sort(pairs["user_id"].unique().to_numpy()).astype(str)
        self.item_ids = np.sort(pairs["item_id"].unique().to_numpy()).astype(str)
        self._index()
        users = pl.Series(self.user_ids).to_frame("user_id").with_row_index("u")
        items = pl.Series(self.item_ids).to_frame("item_id").with_row_index("i")
        coded = pairs.join(users, on="user_id").join(items, on="item_id").sort("u", "i")
        u = coded["u"].to_numpy().astype(np.int64)
        i = coded["i"].to_numpy().astype(np.int64)
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        self.train_indptr = np.searchsorted(u, np.arange(n_users + 1)).astype(np.int64)
        self.train_items = i.astype(np.int32)
        weights = recency_weights(coded["more_recent"].to_numpy(), cfg.recency)

        threads = torch.get_num_threads()
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        try:
            self._train(u, i, n_users, n_items, weights)
        finally:
            torch.set_num_threads(threads)
        self.train_seconds = time.perf_counter() - started
        return self

    def _train(self, u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, weights: np.ndarray | None) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        P = torch.nn.Parameter(0.1 * torch.randn(n_users, cfg.dim, generator=gen))
        Q = torch.nn.Parameter(0.1 * torch.randn(n_items, cfg.dim, generator=gen))
        b = torch.nn.Parameter(torch.zeros(n_items))
        optimizer = torch.optim.Adam([P, Q, b], lr=cfg.lr)
        tu, ti = torch.from_numpy(u), torch.from_numpy(i)
        positive_keys = torch.from_numpy(u * n_items + i)  # sorted: (u, i) sorted
        epoch_order = positive_sampler(weights, len(u), cfg.epoch_samples)

        self.losses = []
        for _ in range(cfg.epochs):
            order = epoch_order(gen)
            total = 0.0
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                bu, bi = tu[batch], ti[batch]
                bj = _sample_negatives(bu, n_items, positive_keys, gen)
                pu, qi, qj = P[bu], Q[bi], Q[bj]
                margin = (pu * (qi - qj)).sum(1) + b[bi] - b[bj]
                l2 = (pu.square().sum(1) + qi.square().sum(1) + qj.square().sum(1)
                      + b[bi].square() + b[bj].square())
                loss = -torch.nn.functional.logsigmoid(margin).mean() + cfg.reg * l2.mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            self.losses.append(total / max(len(order), 1))

        self.user_factors = P.detach().numpy().astype(np.float32)
        self.item_factors = Q.detach().numpy().astype(np.float32)
        self.item_bias = b.detach().numpy().astype(np.float32)

    # ------------------------------------------------------------------- scoring
    def user_vector(self, user_id: str, history: Sequence[str]) -> np.ndarray:
        """The learned vector of a training user, else the mean of the known history items'."""
        k = self._user_index.get(user_id)
        if k is not None:
            return self.user_factors[k]
        codes = [c for c in (self._item_index.get(i) for i in history) if c is not None]
        if not codes:
            return np.zeros(self.item_factors.shape[1], np.float32)
        return self.item_factors[codes].mean(axis=0)

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        vector = self.user_vector(user_id, history)
        codes = [self._item_index.get(c) for c in candidates]
        known = np.array([c is not None for c in codes], dtype=bool)
        scores = np.full(len(candidates), UNKNOWN_SCORE, dtype=np.float64)
        if known.any():
            idx = np.array([c for c in codes if c is not None])
            scores[known] = self.item_factors[idx] @ vector + self.item_bias[idx]
        return scores

    def knows_item(self, item_id: str) -> bool:
        return item_id in self._item_index

    def training_items_of(self, user_id: str) -> list[str]:
        """The items the model was trained on for ``user_id`` (empty for unknown users)."""
        k = self._user_index.get(user_id)
        if k is None:
            return []
        return self.item_ids[self.train_items[self.train_indptr[k] : self.train_indptr[k + 1]]].tolist()

    def evaluate(self, tasks: pl.DataFrame, seed: int = 0) -> dict[str, float]:
        """Mean NDCG@1/5/10, HR@1/5/10 and MRR over ``tasks``; also stored as ``validation_metrics``."""
        self.validation_metrics = evaluate_recommender(self, tasks, seed=seed)
        return self.validation_metrics

    # ---------------------------------------------------------------- save/load
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "bprmf.npz",
            user_factors=self.user_factors, item_factors=self.item_factors,
            item_bias=self.item_bias, user_ids=self.user_ids, item_ids=self.item_ids,
            train_indptr=self.train_indptr, train_items=self.train_items,
        )
        meta = {
            "name": self.name, "config": asdict(self.config), "losses": self.losses,
            "validation_metrics": self.validation_metrics, "train_seconds": self.train_seconds,
            "n_users": len(self.user_ids), "n_items": len(self.item_ids),
            "n_train_pairs": len(self.train_items),
        }
        (folder / "bprmf.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> BPRMF:
        folder = Path(folder)
        meta = json.loads((folder / "bprmf.json").read_text())
        with np.load(folder / "bprmf.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(
            config=BPRConfig(**{**LEGACY_CONFIG, **meta["config"]}), name=meta.get("name", "bprmf"),
            losses=meta["losses"], validation_metrics=meta["validation_metrics"],
            train_seconds=meta.get("train_seconds", 0.0), **arrays,
        )


def recency_weights(more_recent: np.ndarray, recency: float) -> np.ndarray | None:
    """``exp(-more_recent / recency)`` per pair; None (uniform) when ``recency`` is 0."""
    return np.exp(-np.asarray(more_recent, dtype=np.float64) / recency) if recency > 0 else None


def positive_sampler(weights: np.ndarray | None, n_pairs: int,
                     epoch_samples: int) -> Callable[[torch.Generator], torch.Tensor]:
    """The pair indices of one epoch, as a function of the generator: every pair once,
    shuffled (classical BPR: no weights and ``epoch_samples <= n_pairs``), else
    ``max(n_pairs, epoch_samples)`` draws with replacement, pair ``k`` with probability
    ``weights[k] / sum(weights)`` (inverse CDF: one uniform draw each)."""
    draws = max(n_pairs, epoch_samples)
    if weights is None and draws == n_pairs:
        return lambda gen: torch.randperm(n_pairs, generator=gen)
    cumulative = torch.from_numpy(np.cumsum(weights if weights is not None else np.ones(n_pairs)))

    def weighted(gen: torch.Generator) -> torch.Tensor:
        targets = torch.rand(draws, generator=gen, dtype=torch.float64) * cumulative[-1]
        return torch.searchsorted(cumulative, targets, right=True).clamp(max=n_pairs - 1)

    return weighted


def training_pairs(interactions: pl.DataFrame) -> pl.DataFrame:
    """Unique ``(user_id, item_id)`` pairs with ``more_recent``: how many of the user's
    interactions come after the pair's last occurrence (0: the user's most recent item).

    Chronology: ``timestamp`` then ``order`` when present, else the frame's row order."""
    order = [c for c in ("timestamp", "order") if c in interactions.columns]
    ranked = interactions.select("user_id", "item_id", *order).with_row_index("_row")
    ranked = ranked.sort(["user_id", *order, "_row"]).with_columns(
        more_recent=(pl.len() - 1 - pl.int_range(pl.len())).over("user_id"))
    return ranked.group_by("user_id", "item_id").agg(pl.col("more_recent").min())


def _sample_negatives(users: torch.Tensor, n_items: int, positive_keys: torch.Tensor,
                      gen: torch.Generator, rounds: int = 3) -> torch.Tensor:
    """Uniform items, resampled (up to ``rounds`` times) where they hit a positive of the user."""
    negatives = torch.randint(n_items, (len(users),), generator=gen)
    for _ in range(rounds):
        keys = users * n_items + negatives
        pos = torch.searchsorted(positive_keys, keys).clamp(max=len(positive_keys) - 1)
        hit = positive_keys[pos] == keys
        if not bool(hit.any()):
            break
        negatives[hit] = torch.randint(n_items, (int(hit.sum()),), generator=gen)
    return negatives


def evaluate_recommender(recommender, tasks: pl.DataFrame, seed: int = 0) -> dict[str, float]:
    """Mean ranking metrics of any ``Recommender`` on a tasks frame, plus ``n_tasks``."""
    per_task = []
    for task in tasks.iter_rows(named=True):
        candidates = task["candidate_item_ids"]
        scores = recommender.score(task["user_id"], task["history_item_ids"], candidates)
        ranking = rank_by_scores(candidates, scores, seed=seed)
        per_task.append(task_metrics(ranking, task["target_item_id"]))
    return {**mean_metrics(per_task), "n_tasks": float(len(per_task))}
