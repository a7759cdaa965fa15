"""Benchmark the tool indexes (build time, peak memory) and the tools (per-call latency).

    .venv/bin/python scripts/benchmark_tools.py [--data-dir ../shared/data] [--datasets ml-1m amazon-cds] [--calls 3000]

For each dataset: load it, build the protocol's tasks, then the index interactions and the
five indexes (the same ``build_all`` the pipeline uses), save and reload them, run the
leakage report, and time every tool over ``--calls`` calls on random tasks with random valid
arguments (``Toolbox.call`` in-process; the first call of a fresh Toolbox included).

Memory is the peak resident set size (RSS) above the RSS at the start of each stage,
sampled every 2 ms from ``/proc/self/statm`` by a background thread (it covers numpy,
polars and torch memory alike, unlike tracemalloc). Where ``/proc`` is missing it falls
back to ``resource.getrusage`` (process peak, so not per stage). Targets: ML-1M total
index build < 60 s, every tool p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recthinker_dagster.data.sources import load_dataset  # noqa: E402
from recthinker_dagster.protocol import build_task_splits, protocol_config_for  # noqa: E402
from recthinker_dagster.tools import (  # noqa: E402
    TOOL_NAMES, ToolIndexes, Toolbox, build_all, index_interactions, leakage_report,
)
from recthinker_dagster.tools.text import tokenize  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except OSError:  # not Linux: the process peak (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """Context manager: ``.peak`` = max sampled RSS minus RSS at entry (bytes)."""

    def __enter__(self):
        self.start = self.peak_abs = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak_abs = max(self.peak_abs, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, rss_bytes())
        self.peak = self.peak_abs - self.start


def mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def random_arguments(name: str, box: Toolbox, rng: random.Random, vocab: list[str]) -> dict:
    labels = list(box.labels)
    if name == "get_user_profile":
        return {}
    if name == "search_user_history":
        return {"query": rng.choice(vocab), "limit": 10} if rng.random() < 0.5 else {"limit": 10}
    if name == "get_item_info":
        return {"item_ids": rng.sample(labels, rng.randint(1, 5))}
    if name == "search_items":
        return {"query": " ".join(rng.sample(vocab, rng.randint(1, 3))), "limit": 5}
    if name == "find_similar_users":
        return {"limit": 5}
    if name == "get_related_items":
        return {"item_id": rng.choice(labels + box.history[-5:]), "limit": 5}
    return {"item_ids": labels}


def bench_tools(indexes, tasks: pl.DataFrame, calls: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = list(tasks.iter_rows(named=True))
    titles = [t for t in indexes.catalog.titles if t]
    vocab = sorted({w for t in titles for w in tokenize(t) if len(w) > 2} | {
        w for cats in indexes.catalog.categories for c in cats for w in tokenize(c)})
    timings = {name: [] for name in ("Toolbox()", "candidate_lines", *TOOL_NAMES)}
    failures = 0
    for name in TOOL_NAMES:
        for _ in range(calls):
            task = rng.choice(rows)
            start = time.perf_counter_ns()
            box = Toolbox(indexes, task)
            timings["Toolbox()"].append(time.perf_counter_ns() - start)
            args = random_arguments(name, box, rng, vocab)
            start = time.perf_counter_ns()
            result = box.call(name, args)
            timings[name].append(time.perf_counter_ns() - start)
            failures += not result.ok
            if name == "get_user_profile":
                start = time.perf_counter_ns()
                box.candidate_lines()
                timings["candidate_lines"].append(time.perf_counter_ns() - start)
    print(f"  {'call':<22}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in timings.items():
        ms = np.array(values) / 1e6
        flag = "" if name not in TOOL_NAMES or np.percentile(ms, 99) < 5 else "  > 5 ms target"
        print(f"  {name:<22}{len(ms):>7}{np.percentile(ms, 50):>10.3f}{np.percentile(ms, 99):>10.3f}"
              f"{ms.max():>10.3f}{flag}")
    print(f"  failed calls (should be 0): {failures}")


def run(dataset: str, data_dir: Path, calls: int, seed: int) -> None:
    print(f"\n=== {dataset} ===")
    data, _ = load_dataset(dataset, data_dir, allow_download=False)
    splits = build_task_splits(data.interactions, protocol_config_for(dataset), dataset)
    start = time.perf_counter()
    visible = index_interactions(splits.train_interactions, splits.tasks)
    print(f"interactions {data.interactions.height:,}, index interactions {visible.height:,} "
          f"({time.perf_counter() - start:.2f} s), tasks {splits.tasks.height}")

    memory: dict[str, int] = {}

    @contextlib.contextmanager
    def monitor(name):
        with PeakRSS() as peak:
            yield
        memory[name] = peak.peak

    valid = splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(visible, data.items, data.users, valid, monitor=monitor)
    total = sum(indexes.build_seconds.values())
    print("index build (peak = RSS above the stage's starting RSS, sampled every 2 ms):")
    for name, seconds in indexes.build_seconds.items():
        print(f"  {name:<15}{seconds:8.2f} s   peak {mib(memory[name])}")
    target = "  (target < 60 s)" if dataset == "ml-1m" else ""
    print(f"  {'total':<15}{total:8.2f} s{target}")
    metrics = indexes.bprmf.validation_metrics
    print("BPR-MF losses per epoch:", " ".join(f"{x:.3f}" for x in indexes.bprmf.losses))
    print("BPR-MF valid metrics:", ", ".join(f"{k} {metrics[k]:.3f}" for k in ("ndcg@1", "ndcg@5", "ndcg@10")),
          f"({int(metrics['n_tasks'])} tasks)")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folders = indexes.save(Path(tmp))
        saved = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        start = time.perf_counter()
        indexes = ToolIndexes.load(folders)
        print(f"save {saved:.2f} s ({size / 2**20:.1f} MiB on disk), load {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    report = leakage_report(indexes, splits.tasks)
    print(f"leakage report: ok={report['ok']} leaks={sum(report['leaks'].values())} "
          f"mismatches={sum(report['mismatches'].values())} ({time.perf_counter() - start:.2f} s)")
    print(f"tool latency over {calls} calls per tool on random tasks (Toolbox.call, in-process):")
    bench_tools(indexes, splits.tasks, calls, seed)


def main() -> None:
    default_dir = os.environ.get("RECTHINKER_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(default_dir))
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--calls", type=int, default=3000, help="calls per tool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "getloadavg"):
        print("load average at start (1, 5, 15 min):", " ".join(f"{x:.2f}" for x in os.getloadavg()),
              f"on {os.cpu_count()} CPUs")
    for dataset in args.datasets:
        run(dataset, args.data_dir, args.calls, args.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nprocess peak RSS (resource.ru_maxrss): {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
