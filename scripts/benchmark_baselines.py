"""Benchmark the classical baselines on ML-1M and Amazon CDs with a profile's protocol.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_baselines.py [--profile demo]
        [--set SECTION.FIELD=VALUE] [--data-dir DIR] [--root DIR] [--datasets ml-1m amazon-cds]
        [--systems random popularity itemknn bprmf sasrec] [--split eval] [--seed N] [--plot-dir DIR]

For each dataset the pipeline's own stages (``stages.ingest``, ``stages.splits``,
``stages.indexes``), with the profile's settings (``profiles/<name>.yaml``; ``--set``
overrides one), publish the tables, the tasks and the tool indexes under ``--root``
(default: a temporary directory; a root that already holds them, e.g. ``--root .`` after
``dvc pull``, is read as it is) from the raw files in ``--data-dir`` (default
``$RECTHINKER_SHARED_DATA``, else ``shared/data`` next to the repository). Every baseline is
then fitted as the evaluation stage fits it (``stages.evaluation.fitted_recommender``: on the
index interactions, with the profile's ``evaluation`` settings; BPR-MF is the tool indexes'
CF model, trained by the index stage) and the script prints the fit and scoring times and a
Markdown table (NDCG@1/5/10 per group, mean [95% bootstrap CI]) on the ``--split`` tasks
(``eval`` by default). ``--seed`` (default: the profile's ``evaluation.seed``) drives
tie-breaking, the bootstrap and the seeded recommenders. Nothing is tuned on eval tasks: the
only tuned defaults (SASRec's learning rate and training length) were picked on ML-1M *valid*
tasks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from recthinker_dagster.artifacts import (
    ArtifactLayout,
    index_folders,
    load_tool_indexes,
    read_tasks,
    read_train_interactions,
)
from recthinker_dagster.cli import parse_overrides
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.evaluation.report import plot_ndcg_by_system, results_table_markdown
from recthinker_dagster.settings import CLASSICAL_SYSTEMS, EvaluationSettings, Profile, default_profile_name, load_profile
from recthinker_dagster.stages.evaluation import fitted_recommender
from recthinker_dagster.stages.indexes import build_tool_indexes_stage
from recthinker_dagster.stages.ingest import build_ingest_stage
from recthinker_dagster.stages.splits import build_task_splits_stage
from recthinker_dagster.tools import index_interactions

REPO = Path(__file__).resolve().parents[1]


def publish_inputs(profile: Profile, layout: ArtifactLayout, dataset: str) -> None:
    """Run the ingest, splits and tool-index stages into ``layout`` unless it already holds their folders."""
    if not layout.asset_dir("task_splits", dataset).exists():
        build_ingest_stage(replace(profile.ingest, allow_download=False), layout, dataset, log=lambda _: None)
        build_task_splits_stage(profile.protocol, layout, dataset, log=lambda _: None)
    if not all(folder.exists() for folder in index_folders(layout, dataset).values()):
        build_tool_indexes_stage(profile.tool_indexes, layout, dataset, log=lambda _: None)


def benchmark(layout: ArtifactLayout, dataset: str, systems: list[str], split: str, settings: EvaluationSettings,
              plot_dir: Path | None) -> str:
    tasks = read_tasks(layout, dataset, (split,))
    visible = index_interactions(read_train_interactions(layout, dataset), read_tasks(layout, dataset))
    indexes = load_tool_indexes(layout, dataset)
    print(f"\n## {dataset}: {visible.height} index interactions, {tasks.height} {split} tasks "
          f"{dict(tasks.group_by('group').len().sort('group').iter_rows())}", flush=True)
    summaries = {}
    for name in systems:
        started = time.perf_counter()
        model = fitted_recommender(name, visible, indexes, settings)
        fitted = time.perf_counter() - started
        per_task = evaluate_recommender(model, tasks, seed=settings.seed)
        scored = time.perf_counter() - started - fitted
        note = " (the tool indexes' CF model)" if name == "bprmf" else ""
        print(f"- {name}: fit {fitted:.1f} s{note}, scoring {scored:.1f} s", flush=True)
        summaries[name] = summarize(per_task, n_resamples=settings.n_bootstrap, seed=settings.seed)
    table = results_table_markdown(summaries, metrics=("ndcg@1", "ndcg@5", "ndcg@10"))
    print(f"\n{table}", flush=True)
    if plot_dir is not None:
        path = plot_ndcg_by_system(summaries, plot_dir / f"ndcg10_{dataset}.png",
                                   title=f"{dataset} ({split}): NDCG@10, 95% CI")
        print(f"plot: {path}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=default_profile_name(), help="profiles/<name>.yaml (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable), e.g. --set evaluation.sasrec_train_windows=5000")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("RECTHINKER_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--root", type=Path, help="project root for the artifacts (default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--systems", nargs="+", default=list(CLASSICAL_SYSTEMS), choices=list(CLASSICAL_SYSTEMS))
    parser.add_argument("--split", default="eval", choices=["eval", "valid"])
    parser.add_argument("--seed", type=int, help="tie-breaking and bootstrap seed (default: the profile's)")
    parser.add_argument("--plot-dir", type=Path, default=None, help="also write NDCG@10 PNGs here")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile, parse_overrides(args.set))
    settings = profile.evaluation if args.seed is None else replace(profile.evaluation, seed=args.seed)

    with tempfile.TemporaryDirectory(prefix="benchmark-baselines-") as scratch:
        layout = ArtifactLayout((args.root or Path(scratch)).resolve(), data_dir=args.data_dir)
        for dataset in args.datasets:
            publish_inputs(profile, layout, dataset)
            benchmark(layout, dataset, args.systems, args.split, settings, args.plot_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
