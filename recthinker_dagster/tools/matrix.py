"""Sparse user-item matrices and blocked top-k, shared by the collaborative indexes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
import scipy.sparse as sp

BLOCK_CELLS = 4_000_000  # dense cells per block of a blocked similarity product


def user_item_matrix(interactions: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Sorted user ids, sorted item ids and the binary users x items CSR matrix (float32)."""
    pairs = interactions.select("user_id", "item_id").unique()
    user_ids = np.sort(pairs["user_id"].unique().to_numpy()).astype(str)
    item_ids = np.sort(pairs["item_id"].unique().to_numpy()).astype(str)
    rows = np.searchsorted(user_ids, pairs["user_id"].to_numpy().astype(str))
    cols = np.searchsorted(item_ids, pairs["item_id"].to_numpy().astype(str))
    data = np.ones(len(rows), np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(user_ids), len(item_ids)))
    matrix.sort_indices()
    return user_ids, item_ids, matrix


def blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    size = max(1, BLOCK_CELLS // max(n_cols, 1))
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def cosine_topk(left: sp.csr_matrix, right_t: sp.csr_matrix, k: int, min_count: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` columns per row of ``cosine = (left @ right_t) / sqrt(n_row * n_col)`` for binary
    matrices where row ``r`` of ``left`` and column ``r`` of ``right_t`` are the same entity
    (so the diagonal is skipped). Returns ``(neighbours, cosine, counts)``, each (rows, k),
    sorted by cosine, then count, then index; ``-1`` / 0 pad rows with fewer neighbours."""
    n = left.shape[0]
    k = max(0, min(k, n - 1))
    row_n = np.asarray(left.sum(axis=1), dtype=np.float64).ravel()
    col_n = np.asarray(right_t.sum(axis=0), dtype=np.float64).ravel()
    neighbours = np.full((n, k), -1, np.int32)
    cosine = np.zeros((n, k), np.float32)
    counts = np.zeros((n, k), np.int32)
    if k == 0:
        return neighbours, cosine, counts
    for block in blocks(n, right_t.shape[1]):
        overlap = (left[block] @ right_t).toarray()
        rows = np.arange(block.stop - block.start)
        overlap[rows, rows + block.start] = 0
        denom = np.sqrt(np.outer(row_n[block], col_n))
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where((overlap >= min_count) & (denom > 0), overlap / denom, 0.0)
        part = np.argpartition(-cos, k - 1, axis=1)[:, :k]
        c = np.take_along_axis(cos, part, 1)
        o = np.take_along_axis(overlap, part, 1)
        order = np.lexsort((part, -o, -c), axis=-1)
        part, c, o = (np.take_along_axis(a, order, 1) for a in (part, c, o))
        empty = c <= 0
        neighbours[block] = np.where(empty, -1, part)
        cosine[block] = np.where(empty, 0, c)
        counts[block] = np.where(empty, 0, o)
    return neighbours, cosine, counts
