"""Candidate sets: the target plus sampled negatives, shuffled.

Negatives are drawn uniformly, without replacement, from the catalog items (integer codes
``0..n_items-1``) that the user never interacted with, future included. Each task has its
own random generator seeded by ``(seed, crc32(task key))``, so a task's candidates do not
depend on which other tasks are built alongside it (smoke, demo and full runs agree).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def task_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the task key."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def sample_negatives(
    rng: np.random.Generator, seen: np.ndarray, n_items: int, k: int
) -> np.ndarray:
    """``k`` distinct codes in ``0..n_items-1`` not in ``seen`` (sorted, unique), uniformly."""
    n_free = n_items - len(seen)
    if n_free < k:
        raise ValueError(f"only {n_free} unseen items, need {k} negatives")
    if 2 * len(seen) > n_items or n_free < 4 * k:
        # Small complement: enumerate it.
        free = np.ones(n_items, dtype=bool)
        free[seen] = False
        return rng.choice(np.flatnonzero(free), size=k, replace=False)
    # Large complement: rejection sampling, keeping first occurrences (same distribution).
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < k:
        draws = rng.integers(0, n_items, size=2 * k)
        chosen = np.concatenate([chosen, draws[~np.isin(draws, seen)]])
        _, first = np.unique(chosen, return_index=True)
        chosen = chosen[np.sort(first)]
    return chosen[:k]


def sample_candidates(
    targets: np.ndarray,
    seen_per_task: Sequence[np.ndarray],
    keys: Sequence[str],
    n_items: int,
    n_candidates: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate codes ``(n_tasks, n_candidates)`` and the target's position in each row.

    ``seen_per_task[i]``: sorted unique codes of every item the task's user interacted with.
    """
    n_tasks = len(targets)
    candidates = np.empty((n_tasks, n_candidates), dtype=np.int64)
    positions = np.empty(n_tasks, dtype=np.int32)
    for i in range(n_tasks):
        rng = task_rng(seed, keys[i])
        try:
            negatives = sample_negatives(rng, seen_per_task[i], n_items, n_candidates - 1)
        except ValueError as err:
            raise ValueError(f"task {keys[i]}: {err}") from None
        order = rng.permutation(n_candidates)
        candidates[i, order] = np.concatenate([[targets[i]], negatives])
        positions[i] = order[0]
    return candidates, positions
