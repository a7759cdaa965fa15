"""Benchmark catalog search: our hand-written BM25 (``tools/text.py``) against the ``bm25s`` library.

    RECTHINKER_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_search.py \\
        [--data-dir ../shared/data] [--root DIR] [--datasets ml-1m amazon-cds] \\
        [--sample 1000] [--queries 2000] [--repeats 3] [--seed 0]

For each dataset the pipeline's own stages (``stages.inputs.ensure_tasks``: ingest, task
splits; skipped when ``--root`` already holds the tasks) give the items and the index
interactions, and ``ItemCatalog.build`` the catalog table (popularity). Over the catalog's
documents (``catalog.item_documents``: title, year, categories, creator, description),
three engines are built with the catalog's k1 and b, in the same run:

``ours``         ``tools.text.BM25``: Lucene-style BM25, idf ``log(1 + (N - df + .5) / (df + .5))``,
                 tokens = lowercase letter/digit runs, repeated query terms counted once
``bm25s``        ``bm25s.BM25(method="lucene")`` (same idf; its tf part lacks our constant
                 factor ``k1 + 1``, so its scores are ours / (k1 + 1) and rank the same), fed
                 our tokens (vocabulary sorted, so the index is byte-reproducible), repeated
                 query terms counted once; scores from ``get_scores_from_ids``
``bm25s-tok``    the same with bm25s' own tokenizer (``bm25s.tokenize``: ``\\w\\w+``, English
                 stopwords, no stemmer: PyStemmer is an extra dependency)

Measured: (a) known-item retrieval: a seeded sample of items with a title, queried by their
title and by "creator (else first category) + one title word"; MRR, hit@1, hit@5 of the item in
the BM25 ranking (ties by popularity, as the catalog breaks them) and in ``ItemCatalog.search``
(the ``search_items`` path: an exact title match first); (b) agreement with ``ours`` over
those queries plus random 1-3-word queries (words of titles and categories): top-5 overlap,
identical top-5, Spearman rho of the scores over the matched items, identical history-filter
sets (``scores > 0``), the largest deviation from ``ours / (k1 + 1)``; (c) speed: index build
(median of ``--repeats``, tokenizing included), load from disk (median), queries per second of
``ItemCatalog.search(q, 5)``, of scoring every item (the ``search_user_history`` filter) and of
``bm25s``' own ``retrieve(k=5)`` (top-k only, no popularity ties: for reference); (d) size on
disk (``bm25.npz`` vs bm25s' ``save`` folder), memory the index keeps and the build's peak
(``tracemalloc``, numpy arrays included). Speed runs without tracemalloc; q/s is the best of
``--repeats`` passes over all queries; in every round of builds and of passes the engines take
turns, so a change in the machine's load hits them alike.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
from scipy.stats import spearmanr

from recthinker_dagster.artifacts import ArtifactLayout, read_table, read_tasks, read_train_interactions
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.stages.inputs import ensure_tasks
from recthinker_dagster.tools import index_interactions
from recthinker_dagster.tools.catalog import ItemCatalog, item_documents
from recthinker_dagster.tools.text import BM25, tokenize

logging.getLogger("bm25s").setLevel(logging.WARNING)


# ---------------------------------------------------------------- the engines
class Bm25sIndex:
    """A ``bm25s.BM25`` behind ``tools.text.BM25``'s interface (``scores(query)``, save/load)."""

    def __init__(self, retriever: bm25s.BM25, tokens: Callable[[str], list[str]]):
        self.retriever, self.tokens = retriever, tokens
        self.n_docs = int(retriever.scores["num_docs"])

    @classmethod
    def build(cls, documents: list[str], k1: float, b: float, own_tokenizer: bool = False) -> Bm25sIndex:
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        if own_tokenizer:
            corpus = bm25s.tokenize(documents, stopwords="en", show_progress=False)
            retriever.index(corpus, create_empty_token=False, show_progress=False)
            return cls(retriever, bm25s_tokens)
        docs = [tokenize(d) for d in documents]
        vocab = {t: k for k, t in enumerate(sorted({t for d in docs for t in d}))}
        retriever.index(([[vocab[t] for t in d] for d in docs], vocab), create_empty_token=False, show_progress=False)
        return cls(retriever, tokenize)

    def query_tokens(self, query: str) -> list[str]:
        return list(dict.fromkeys(self.tokens(query)))  # each term once, as ours counts them

    def scores(self, query: str) -> np.ndarray:
        ids = self.retriever.get_tokens_ids(self.query_tokens(query))
        if not ids:
            return np.zeros(self.n_docs, np.float32)
        return self.retriever.get_scores_from_ids(ids)

    def retrieve(self, query: str, k: int) -> np.ndarray:
        return self.retriever.retrieve([self.query_tokens(query)], k=k, show_progress=False, return_as="documents")[0]

    def save(self, folder: Path) -> None:
        self.retriever.save(folder, show_progress=False)

    @classmethod
    def load(cls, folder: Path, own_tokenizer: bool = False) -> Bm25sIndex:
        return cls(bm25s.BM25.load(folder, show_progress=False), bm25s_tokens if own_tokenizer else tokenize)


def bm25s_tokens(text: str) -> list[str]:
    return bm25s.tokenize(text, stopwords="en", return_ids=False, show_progress=False)[0]


@dataclass
class Engine:
    name: str
    build: Callable[[list[str]], object]
    save: Callable[[object, Path], Path]  # returns the path(s) to size
    load: Callable[[Path], object]


def engines(k1: float, b: float) -> list[Engine]:
    def save_ours(index, folder):
        folder.mkdir(parents=True, exist_ok=True)
        index.save(folder / "bm25.npz")
        return folder

    def save_bm25s(index, folder):
        index.save(folder)
        return folder

    return [
        Engine("ours", lambda docs: BM25.build(docs, k1=k1, b=b), save_ours, lambda f: BM25.load(f / "bm25.npz")),
        Engine("bm25s", lambda docs: Bm25sIndex.build(docs, k1, b), save_bm25s, Bm25sIndex.load),
        Engine("bm25s-tok", lambda docs: Bm25sIndex.build(docs, k1, b, own_tokenizer=True), save_bm25s,
               lambda f: Bm25sIndex.load(f, own_tokenizer=True)),
    ]


# ---------------------------------------------------------------- the queries
def known_item_queries(catalog: ItemCatalog, sample: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """``{"title": [(query, code)], "creator+word": [...]}`` for a seeded sample of titled items."""
    rng = random.Random(seed)
    titled = [k for k, title in enumerate(catalog.titles) if title and tokenize(title)]
    codes = sorted(rng.sample(titled, min(sample, len(titled))))
    by_title, by_creator = [], []
    for k in codes:
        title = catalog.titles[k] or ""
        by_title.append((title, k))
        head = catalog.creators[k] or (catalog.categories[k][0] if catalog.categories[k] else None)
        if head:
            words = tokenize(title)
            long = [w for w in words if len(w) > 2] or words
            by_creator.append((f"{head} {rng.choice(long)}", k))
    return {"title": by_title, "creator+word": by_creator}


def random_queries(catalog: ItemCatalog, n: int, seed: int) -> list[str]:
    """1-3 words of titles and categories, as ``scripts/benchmark_tools.py`` draws them."""
    rng = random.Random(seed)
    vocab = sorted({w for t in catalog.titles if t for w in tokenize(t) if len(w) > 2}
                   | {w for cats in catalog.categories for c in cats for w in tokenize(c)})
    return [" ".join(rng.sample(vocab, rng.randint(1, 3))) for _ in range(n)]


# ---------------------------------------------------------------- measures
def bm25_rank(scores: np.ndarray, target: int, popularity: np.ndarray) -> float:
    """1-based rank of ``target`` by score, ties by popularity then code; inf when it scores 0."""
    s = scores[target]
    if s <= 0:
        return float("inf")
    p = popularity[target]
    ahead = (scores > s) | ((scores == s) & ((popularity > p) | ((popularity == p) & (np.arange(len(scores)) < target))))
    return 1.0 + float(np.count_nonzero(ahead))


def rank_metrics(ranks: list[float]) -> tuple[float, float, float]:
    r = np.asarray(ranks)
    return float(np.mean(1.0 / r)), float(np.mean(r <= 1)), float(np.mean(r <= 5))


def quality(catalog: ItemCatalog, sets: dict[str, list[tuple[str, int]]]) -> dict[str, tuple[float, ...]]:
    out: dict[str, tuple[float, ...]] = {}
    n = len(catalog.item_ids)
    for name, queries in sets.items():
        plain, tool = [], []
        for query, k in queries:
            plain.append(bm25_rank(catalog.bm25.scores(query), k, catalog.popularity))
            found = catalog.search(query, n)
            tool.append(found.index(k) + 1.0 if k in found else float("inf"))
        out[name] = (*rank_metrics(plain), *rank_metrics(tool), float(len(queries)))
    return out


def agreement(ours: ItemCatalog, other: ItemCatalog, queries: list[str], scale: float | None) -> dict[str, float]:
    overlap, same, rhos, filters, deviation = [], [], [], [], 0.0
    for query in queries:
        a, b = ours.search(query, 5), other.search(query, 5)
        overlap.append(len(set(a) & set(b)) / max(len(a), len(b)) if a or b else 1.0)
        same.append(a == b)
        sa, sb = ours.bm25.scores(query), other.bm25.scores(query)
        filters.append(np.array_equal(sa > 0, sb > 0))
        union = np.flatnonzero((sa > 0) | (sb > 0))
        if len(union) >= 2 and np.ptp(sa[union]) > 0 and np.ptp(sb[union]) > 0:
            rhos.append(spearmanr(sa[union], sb[union]).statistic)
        if scale is not None and sa.max() > 0:
            deviation = max(deviation, float(np.abs(sa / scale - sb).max() / (sa.max() / scale)))
    return {"overlap": float(np.mean(overlap)), "same": float(np.mean(same)), "rho": float(np.mean(rhos)),
            "filter": float(np.mean(filters)), "deviation": deviation if scale is not None else float("nan")}


def queries_per_second(fns: Mapping[str, Callable[[str], object]], queries: list[str], repeats: int) -> dict[str, float]:
    """Queries per second of each function: the best of ``repeats`` passes, the functions taking
    turns within each round (so a change in the machine's load hits them alike)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        for query in queries[:50]:
            fn(query)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for query in queries:
                fn(query)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(queries) / seconds for name, seconds in best.items()}


def search_top5(catalog: ItemCatalog, query: str) -> list[int]:  # the search_items path
    return catalog.search(query, 5)


def history_filter(index, query: str) -> np.ndarray:  # the search_user_history path: every item scored
    return index.scores(query) > 0


def retrieve_top5(index: Bm25sIndex, query: str) -> np.ndarray:  # bm25s' own top-k path
    return index.retrieve(query, 5)


def traced(fn: Callable[[], object]) -> tuple[object, int, int]:
    """``fn()``, the bytes it still holds afterwards and its peak (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, current - base, peak - base


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------- the run
def run(dataset: str, layout: ArtifactLayout, args, scratch: Path) -> dict:
    tasks = read_tasks(layout, dataset)
    visible = index_interactions(read_train_interactions(layout, dataset), tasks)
    base = ItemCatalog.build(read_table(layout, "items", dataset), visible)
    k1, b = base.meta["bm25"]["k1"], base.meta["bm25"]["b"]
    documents = item_documents(base.table)
    sets = known_item_queries(base, args.sample, args.seed)
    mixed = [q for qs in sets.values() for q, _ in qs] + random_queries(base, args.queries, args.seed)
    random.Random(args.seed).shuffle(mixed)
    print(f"{dataset}: {len(documents):,} items ({sum(map(bool, base.titles)):,} titled), "
          f"{sum(len(tokenize(d)) for d in documents):,} tokens, index interactions {visible.height:,}; "
          f"known-item queries {', '.join(f'{k} {len(v)}' for k, v in sets.items())}; {len(mixed):,} mixed queries")
    result: dict = {"quality": {}, "agreement": {}, "speed": {}}
    candidates = engines(k1, b)
    seconds: dict[str, list[float]] = {engine.name: [] for engine in candidates}
    built: dict[str, object] = {}
    for _ in range(args.repeats):  # the engines take turns, as in queries_per_second
        for engine in candidates:
            start = time.perf_counter()
            built[engine.name] = engine.build(documents)
            seconds[engine.name].append(time.perf_counter() - start)
    catalogs, indexes = {}, {}
    for engine in candidates:
        _, kept, peak = traced(functools.partial(engine.build, documents))
        folder = engine.save(built[engine.name], scratch / dataset / engine.name)
        loads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            index = indexes[engine.name] = engine.load(folder)
            loads.append((time.perf_counter() - start) * 1e3)
        catalog = catalogs[engine.name] = ItemCatalog(base.table, index, base.meta)  # type: ignore[arg-type]
        result["quality"][engine.name] = quality(catalog, sets)
        result["speed"][engine.name] = {"build_s": statistics.median(seconds[engine.name]), "load_ms": statistics.median(loads),
                                        "disk_kib": folder_bytes(folder) / 1024,
                                        "kept_mib": kept / 2**20, "peak_mib": peak / 2**20}
    timed: dict[str, dict[str, Callable[[str], object]]] = {
        "search_qps": {name: functools.partial(search_top5, c) for name, c in catalogs.items()},
        "filter_qps": {name: functools.partial(history_filter, i) for name, i in indexes.items()},
        "retrieve_qps": {name: functools.partial(retrieve_top5, i) for name, i in indexes.items()
                         if isinstance(i, Bm25sIndex)},
    }
    for column, fns in timed.items():
        qps = queries_per_second(fns, mixed, args.repeats)
        for name in catalogs:
            result["speed"][name][column] = qps.get(name, float("nan"))
    for name, catalog in catalogs.items():
        if name != "ours":
            result["agreement"][name] = agreement(catalogs["ours"], catalog, mixed, k1 + 1 if name == "bm25s" else None)
    return result


def markdown(results: dict[str, dict]) -> str:
    lines = ["### (a) known-item retrieval (BM25 ranking, ties by popularity | `ItemCatalog.search`, exact title first)",
             "", "| dataset | queries | n | engine | MRR | hit@1 | hit@5 | search MRR | search hit@1 | search hit@5 |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for dataset, result in results.items():
        for name, by_set in result["quality"].items():
            for qset, (mrr, h1, h5, smrr, sh1, sh5, n) in by_set.items():
                lines.append(f"| {dataset} | {qset} | {int(n)} | {name} | {mrr:.4f} | {h1:.4f} | {h5:.4f} | "
                             f"{smrr:.4f} | {sh1:.4f} | {sh5:.4f} |")
    lines += ["", "### (b) agreement with `ours` (all mixed queries)", "",
              "| dataset | engine | top-5 overlap | same top-5 | Spearman rho | same history filter "
              "| max dev. from ours/(k1+1) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for dataset, result in results.items():
        for name, a in result["agreement"].items():
            dev = "n/a" if np.isnan(a["deviation"]) else f"{a['deviation']:.1e}"
            lines.append(f"| {dataset} | {name} | {a['overlap']:.4f} | {a['same']:.4f} | {a['rho']:.4f} | "
                         f"{a['filter']:.4f} | {dev} |")
    lines += ["", "### (c, d) speed and size", "",
              "| dataset | engine | build s | load ms | search_items q/s | history filter q/s | bm25s retrieve(k=5) q/s "
              "| disk KiB | kept MiB | build peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dataset, result in results.items():
        for name, s in result["speed"].items():
            retrieve = "-" if np.isnan(s["retrieve_qps"]) else f"{s['retrieve_qps']:,.0f}"
            lines.append(f"| {dataset} | {name} | {s['build_s']:.3f} | {s['load_ms']:.1f} | {s['search_qps']:,.0f} | "
                         f"{s['filter_qps']:,.0f} | {retrieve} | {s['disk_kib']:,.0f} | {s['kept_mib']:.2f} | "
                         f"{s['peak_mib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, "protocol.seed=0")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, help="project root for the artifacts (default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--sample", type=int, default=1000, help="known items sampled per dataset")
    parser.add_argument("--queries", type=int, default=2000, help="random 1-3-word queries per dataset")
    parser.add_argument("--repeats", type=int, default=7, help="builds (median) and query passes (best)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = profile_from_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    print(f"bm25s {bm25s.__version__}, numpy {np.__version__}; {os.cpu_count()} CPUs"
          + (f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""))
    results = {}
    with tempfile.TemporaryDirectory(prefix="benchmark-search-") as scratch:
        layout = ArtifactLayout((args.root or Path(scratch) / "root").resolve(), data_dir=args.data_dir)
        for dataset in args.datasets:
            ensure_tasks(profile, layout, dataset)
            results[dataset] = run(dataset, layout, args, Path(scratch))
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
