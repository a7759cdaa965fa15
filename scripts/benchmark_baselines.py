"""Benchmark the classical baselines on ML-1M and Amazon CDs with the default protocol.

    .venv/bin/python scripts/benchmark_baselines.py [--data-dir DIR] [--datasets ml-1m amazon-cds]
        [--systems random popularity itemknn bprmf sasrec] [--split eval] [--plot-dir DIR]

For each dataset: load it from ``--data-dir`` (default ``$RECTHINKER_SHARED_DATA``, else
``shared/data`` next to the repository), build the tasks with ``protocol_config_for(dataset)``,
fit every baseline on ``train_interactions`` with its default hyperparameters, and print the
fit times and a Markdown table (NDCG@1/5/10 per group, mean [95% bootstrap CI]) on the
``--split`` tasks (``eval`` by default). Nothing is tuned on eval tasks: the only tuned
defaults (SASRec's learning rate and training length) were picked on ML-1M *valid* tasks.
BPR-MF is skipped, with a note, when ``recthinker_dagster/recommenders/bprmf.py`` is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recthinker_dagster.data.sources import load_dataset  # noqa: E402
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize  # noqa: E402
from recthinker_dagster.evaluation.report import plot_ndcg_by_system, results_table_markdown  # noqa: E402
from recthinker_dagster.protocol import build_task_splits, protocol_config_for  # noqa: E402
from recthinker_dagster.recommenders.registry import (  # noqa: E402
    BASELINES,
    available_baselines,
    make_recommender,
)


def default_data_dir() -> Path:
    return Path(os.environ.get("RECTHINKER_SHARED_DATA", REPO.parent / "shared" / "data"))


def benchmark(dataset: str, data_dir: Path, systems: list[str], split: str, seed: int,
              plot_dir: Path | None) -> str:
    data, _ = load_dataset(dataset, data_dir, allow_download=False)
    splits = build_task_splits(data.interactions, protocol_config_for(dataset), dataset)
    tasks = splits.tasks.filter(split=split)
    train = splits.train_interactions
    print(f"\n## {dataset}: {train.height} training interactions, {tasks.height} {split} tasks "
          f"{dict(tasks.group_by('group').len().iter_rows())}", flush=True)
    summaries = {}
    for name in systems:
        started = time.perf_counter()
        model = make_recommender(name).fit(train)
        fitted = time.perf_counter() - started
        per_task = evaluate_recommender(model, tasks, seed=seed)
        scored = time.perf_counter() - started - fitted
        print(f"- {name}: fit {fitted:.1f} s, scoring {scored:.1f} s", flush=True)
        summaries[name] = summarize(per_task, seed=seed)
    table = results_table_markdown(summaries, metrics=("ndcg@1", "ndcg@5", "ndcg@10"))
    print(f"\n{table}", flush=True)
    if plot_dir is not None:
        path = plot_ndcg_by_system(summaries, plot_dir / f"ndcg10_{dataset}.png",
                                   title=f"{dataset} ({split}): NDCG@10, 95% CI")
        print(f"plot: {path}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--systems", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--split", default="eval", choices=["eval", "valid"])
    parser.add_argument("--seed", type=int, default=0, help="tie-breaking and bootstrap seed")
    parser.add_argument("--plot-dir", type=Path, default=None, help="also write NDCG@10 PNGs here")
    args = parser.parse_args(argv)

    available = available_baselines()
    systems = [s for s in args.systems if s in available]
    for missing in sorted(set(args.systems) - set(available)):
        print(f"note: skipping {missing} (its module is not available yet)")
    for dataset in args.datasets:
        benchmark(dataset, args.data_dir, systems, args.split, args.seed, args.plot_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
