"""The candidate signals of ``score_candidates``, and how a weighted mix of them becomes one score.

Each signal is one classical recommender's opinion of every candidate, computed from the
tool indexes for the task's user and history:

=============== =============================================================== ==========
signal          what it measures                                                from
=============== =============================================================== ==========
``bprmf``       collaborative filtering: BPR-MF user-item match                 cf_model
``itemknn``     co-occurrence of the candidate with the user's history items    cf_model
``recent``      co-occurrence with the user's 5 most recent items (short-term)  cf_model
``sasrec``      sequence: what tends to come next after the user's recent items cf_model
``popularity``  log(1 + training interactions)                                  catalog
``neighbours``  log(1 + how many of the 20 most similar users have it)          similar_users
=============== =============================================================== ==========

:func:`fuse` z-scores each signal over the candidates where it is known (an unknown value
contributes 0, the candidates' mean) and returns ``sum(weight * z)``. The fused order breaks
ties by candidate position, so the same weights always give the same table, which is what
lets a student reproduce a teacher's answer from the last tool output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

SIGNALS = ("bprmf", "itemknn", "recent", "sasrec", "popularity", "neighbours")
NEIGHBOURS = 20  # similar users behind the ``neighbours`` signal
RECENT_ITEMS = 5  # history items behind the ``recent`` signal (chosen by cross-validation on train+valid)
MODEL_OF = {"bprmf": "bprmf", "itemknn": "itemknn", "recent": "itemknn", "sasrec": "sasrec"}  # signal -> cf_model
_TABLE_LINE = re.compile(r"^\d+\. (\S+) [+-]\d", re.MULTILINE)  # a line of format_score_lines
UNKNOWN_BELOW = -1e4  # recommenders score unknown items far below this (BPR-MF -1e6, SASRec -1e9)


class SignalUnavailable(ValueError):
    """A signal whose model is not in this tool suite (e.g. indexes built before it existed)."""


def available_signals(indexes) -> tuple[str, ...]:
    return tuple(name for name in SIGNALS
                 if name not in ("itemknn", "recent", "sasrec") or getattr(indexes, MODEL_OF[name], None))


def raw_signal(indexes, name: str, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """One signal for every candidate (NaN where the model does not know the item)."""
    if name in MODEL_OF:
        model = getattr(indexes, MODEL_OF[name], None)
        if model is None:
            raise SignalUnavailable(f"signal {name!r} is not in this tool suite; rebuild the cf_model index")
        seen = list(history)[-RECENT_ITEMS:] if name == "recent" else list(history)
        scores = np.asarray(model.score(user_id, seen, list(candidates)), dtype=float)
        if model is indexes.itemknn:  # known items score >= 0; -1 marks an unknown one
            return np.where(scores < 0, np.nan, scores)
        return np.where(scores < UNKNOWN_BELOW, np.nan, scores)
    if name == "popularity":
        catalog = indexes.catalog
        return np.array([np.log1p(catalog.popularity[code]) if (code := catalog.code(item)) is not None else np.nan
                         for item in candidates])
    if name == "neighbours":
        similar = indexes.similar_users
        neighbours = similar.neighbours(user_id, list(history), NEIGHBOURS)
        codes = np.array([similar.item_index.get(item, -1) for item in candidates])
        hits = np.zeros(len(candidates))
        for user, _, _ in neighbours:
            hits += np.isin(codes, similar.row_codes(user))
        return np.log1p(hits)
    raise ValueError(f"unknown signal {name!r}; signals: {', '.join(SIGNALS)}")


def zscore(values: np.ndarray) -> np.ndarray:
    """Standardize the finite entries over the candidates; NaN (unknown) and constant signals give 0."""
    out = np.zeros(len(values))
    known = np.isfinite(values)
    if known.sum() >= 2:
        std = values[known].std()
        if std > 1e-9:
            out[known] = (values[known] - values[known].mean()) / std
    return out


def standardized_signals(indexes, names: Sequence[str], user_id: str, history: Sequence[str],
                         candidates: Sequence[str]) -> np.ndarray:
    """``candidates x names``: each signal z-scored over the candidates."""
    columns = [zscore(raw_signal(indexes, name, user_id, history, candidates)) for name in names]
    return np.stack(columns, axis=1) if columns else np.zeros((len(candidates), 0))


def fuse(standardized: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The fused score of every candidate, rounded so that float noise never reorders a table."""
    return np.round(standardized @ np.asarray(weights, dtype=float), 6)


def fused_order(scores: np.ndarray) -> list[int]:
    """Candidate positions, best first; ties keep candidate order."""
    return sorted(range(len(scores)), key=lambda k: (-scores[k], k))


def fused_scores(indexes, weights: Mapping[str, float], user_id: str, history: Sequence[str],
                 candidates: Sequence[str]) -> np.ndarray:
    """``sum(weight * z-scored signal)`` for every candidate (signals with weight 0 are not computed)."""
    used = [name for name, weight in weights.items() if weight]
    return fuse(standardized_signals(indexes, used, user_id, history, candidates), [weights[n] for n in used])


def format_score_lines(labels: Sequence[str], scores: np.ndarray) -> list[str]:
    """The table of ``score_candidates``: ``1. C +1.52``, best first."""
    return [f"{rank}. {labels[k]} {scores[k]:+.2f}" for rank, k in enumerate(fused_order(scores), start=1)]


def score_table_labels(text: str) -> list[str]:
    """The labels of a ``score_candidates`` output, best first (empty for an error or other text)."""
    return _TABLE_LINE.findall(text) if not text.startswith("Error") else []
