"""BM25 text search over item documents, with numpy/scipy sparse arrays.

Tokens are lowercase runs of letters and digits (``[^\\W_]+``, so accented letters count).
Weights are precomputed per (term, document) and stored term-major (CSC), so a query is a
sum over its terms' posting lists.

Kept hand-written after measuring the ``bm25s`` library against it (``scripts/benchmark_search.py``):
with the same tokens and its Lucene variant, bm25s ranks identically (its scores are ours / (k1 + 1))
but scores queries slower (``np.add.at`` and per-call overhead) and builds slower; see docs/tools.md.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recthinker_dagster.tools.store import load_npz, save_npz, str_array

TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str | None) -> list[str]:
    return TOKEN.findall(text.lower()) if text else []


def normalize(text: str | None) -> str:
    """Tokens joined by single spaces (for exact-title matching)."""
    return " ".join(tokenize(text))


class BM25:
    """Okapi BM25 over a fixed list of documents (``k1``, ``b`` as usual)."""

    def __init__(self, vocab: np.ndarray, indptr: np.ndarray, docs: np.ndarray,
                 weights: np.ndarray, n_docs: int, k1: float = 1.2, b: float = 0.75):
        self.vocab, self.indptr, self.docs, self.weights = vocab, indptr, docs, weights
        self.n_docs, self.k1, self.b = n_docs, k1, b
        self.term_index = {t: k for k, t in enumerate(vocab.tolist())}

    @classmethod
    def build(cls, documents: list[str], k1: float = 1.2, b: float = 0.75) -> BM25:
        counts = [Counter(tokenize(doc)) for doc in documents]
        vocab = sorted({t for c in counts for t in c})
        index = {t: k for k, t in enumerate(vocab)}
        doc_of: list[int] = []
        term_of: list[int] = []
        freq: list[int] = []
        for d, c in enumerate(counts):
            doc_of.extend([d] * len(c))
            term_of.extend(index[t] for t in c)
            freq.extend(c.values())
        rows, cols = np.asarray(doc_of, np.int64), np.asarray(term_of, np.int64)
        tf = np.asarray(freq, np.float64)
        length = np.array([sum(c.values()) for c in counts], np.float64)
        avg = length.mean() if len(length) and length.mean() > 0 else 1.0
        df = np.bincount(cols, minlength=len(vocab)).astype(np.float64)
        idf = np.log(1.0 + (len(documents) - df + 0.5) / (df + 0.5))
        weight = idf[cols] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length[rows] / avg))
        matrix = sp.csc_matrix((weight, (rows, cols)), shape=(len(documents), len(vocab)))
        matrix.sort_indices()
        return cls(str_array(vocab), matrix.indptr.astype(np.int64), matrix.indices.astype(np.int32),
                   matrix.data.astype(np.float32), len(documents), k1, b)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (0 where no query term occurs; all 0 for an empty query
        or one without a known term). A repeated query term counts once; terms are summed in
        sorted order, so the float32 scores do not depend on word order or the hash seed."""
        out = np.zeros(self.n_docs, np.float32)
        for term in sorted(set(tokenize(query))):
            k = self.term_index.get(term)
            if k is not None:
                s, e = self.indptr[k], self.indptr[k + 1]
                out[self.docs[s:e]] += self.weights[s:e]
        return out

    def save(self, path: Path) -> None:
        save_npz(path, vocab=self.vocab, indptr=self.indptr, docs=self.docs, weights=self.weights,
                 params=np.array([self.n_docs, self.k1, self.b], np.float64))

    @classmethod
    def load(cls, path: Path) -> BM25:
        a = load_npz(path)
        n_docs, k1, b = a["params"].tolist()
        return cls(a["vocab"], a["indptr"], a["docs"], a["weights"], int(n_docs), k1, b)
