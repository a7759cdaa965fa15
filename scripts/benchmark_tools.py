"""Benchmark the tool indexes (build time, peak memory) and the tools (per-call latency).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_tools.py [--profile demo]
        [--set SECTION.FIELD=VALUE] [--data-dir ../shared/data] [--root DIR]
        [--datasets ml-1m amazon-cds] [--calls 3000]

For each dataset the pipeline's own stages, with the profile's settings
(``profiles/<name>.yaml``; ``--set`` overrides one), run under ``--root`` (default: a
temporary directory): ``stages.ingest`` and ``stages.splits`` (skipped when the root already
holds the tasks), then, measured, ``stages.indexes.build_tool_indexes_stage`` (the index
interactions, the five indexes, saving them). The script reloads the indexes
(``load_tool_indexes``), runs the stage's leakage report and times every tool over
``--calls`` calls on random tasks with random valid arguments (``Toolbox.call`` in-process;
the first call of a fresh Toolbox included).

Memory is the peak resident set size (RSS) above the RSS at the start of each index's build,
sampled every 2 ms from ``/proc/self/statm`` by a background thread (it covers numpy,
polars and torch memory alike, unlike tracemalloc). Where ``/proc`` is missing it falls
back to ``resource.getrusage`` (process peak, so not per stage). Targets: ML-1M total
index build < 60 s, every tool p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl

from recthinker_dagster.artifacts import ArtifactLayout, index_folders, load_tool_indexes, read_table, read_tasks
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.settings import Profile
from recthinker_dagster.stages import indexes as index_stage
from recthinker_dagster.stages.inputs import ensure_tasks
from recthinker_dagster.tools import TOOL_NAMES, Toolbox, build_all
from recthinker_dagster.tools.text import tokenize

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
    timings: dict[str, list[int]] = {name: [] for name in ("Toolbox()", "candidate_lines", *TOOL_NAMES)}
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


def run(profile: Profile, layout: ArtifactLayout, dataset: str, calls: int, seed: int) -> None:
    print(f"\n=== {dataset} ===")
    ensure_tasks(profile, layout, dataset)
    memory: dict[str, int] = {}

    @contextlib.contextmanager
    def monitor(name):
        with PeakRSS() as peak:
            yield
        memory[name] = peak.peak

    # the stage itself, its build_all given the memory monitor
    with mock.patch.object(index_stage, "build_all", functools.partial(build_all, monitor=monitor)):
        start = time.perf_counter()
        result = index_stage.build_tool_indexes_stage(profile.tool_indexes, layout, dataset, log=lambda _: None)
        stage_seconds = time.perf_counter() - start
    tasks = read_tasks(layout, dataset)
    print(f"interactions {read_table(layout, 'interactions', dataset).height:,}, "
          f"index interactions {result.index_interactions:,}, tasks {tasks.height}")
    build_seconds = {name: artifact.metrics["build_seconds"] for name, artifact in result.indexes.items()}
    total = sum(build_seconds.values())
    print("index build (peak = RSS above the stage's starting RSS, sampled every 2 ms):")
    for name, seconds in build_seconds.items():
        print(f"  {name:<15}{seconds:8.2f} s   peak {mib(memory[name])}")
    target = "  (target < 60 s)" if dataset == "ml-1m" else ""
    print(f"  {'total':<15}{total:8.2f} s{target}")
    bprmf = result.indexes["bprmf"]
    print("BPR-MF losses per epoch:", " ".join(f"{x:.3f}" for x in bprmf.series["train_loss"]))
    print("BPR-MF valid metrics:", ", ".join(f"{k} {bprmf.metrics[f'valid_{k}']:.3f}"
                                             for k in ("ndcg@1", "ndcg@5", "ndcg@10")),
          f"({int(bprmf.metrics['valid_n_tasks'])} tasks)")

    size = sum(f.stat().st_size for folder in index_folders(layout, dataset).values()
               for f in folder.rglob("*") if f.is_file())
    start = time.perf_counter()
    indexes = load_tool_indexes(layout, dataset)
    print(f"stage {stage_seconds:.2f} s (reading its inputs and saving: {stage_seconds - total:.2f} s, "
          f"{size / 2**20:.1f} MiB on disk), load {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    report = index_stage.tool_leakage_report(layout, dataset)
    print(f"leakage report: ok={report['ok']} leaks={sum(report['leaks'].values())} "
          f"mismatches={sum(report['mismatches'].values())} ({time.perf_counter() - start:.2f} s with loading)")
    print(f"tool latency over {calls} calls per tool on random tasks (Toolbox.call, in-process):")
    bench_tools(indexes, tasks, calls, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, "tool_indexes.bpr_epochs=2")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, help="project root for the artifacts (default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--calls", type=int, default=3000, help="calls per tool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = profile_from_args(args)
    if hasattr(os, "getloadavg"):
        print("load average at start (1, 5, 15 min):", " ".join(f"{x:.2f}" for x in os.getloadavg()),
              f"on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="benchmark-tools-") as scratch:
        layout = ArtifactLayout((args.root or Path(scratch)).resolve(), data_dir=args.data_dir)
        for dataset in args.datasets:
            run(profile, layout, dataset, args.calls, args.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nprocess peak RSS (resource.ru_maxrss): {peak / 1024:.0f} MiB")

if __name__ == "__main__":
    main()
