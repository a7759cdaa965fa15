"""Benchmark the classical baselines, old and tuned BPR-MF and the ``implicit`` library models.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_baselines.py [--profile demo]
        [--set SECTION.FIELD=VALUE] [--n-candidates 20 10] [--data-dir DIR] [--root DIR]
        [--datasets ml-1m amazon-cds] [--systems popularity bprmf_untuned bprmf implicit_bpr ...]
        [--split eval] [--seed N] [--plot-dir DIR]

For each dataset and each candidate count N (``--n-candidates``; default: 20 and 10), the
pipeline's own stages (``stages.ingest``, ``stages.splits``) with the profile's settings
(``profiles/<name>.yaml``, ``--set`` overrides one; N replaces ``protocol.n_candidates``)
publish the tables and the tasks under ``--root``/n<N> (default: a temporary directory) from
the raw files in ``--data-dir`` (default ``$RECTHINKER_SHARED_DATA``, else ``shared/data``
next to the repository). N changes only the candidates: the users, targets and index
interactions (``tools.index_interactions``, what the tools and the evaluation fit on) are
the same for every N, which the script checks, so each system is fitted once per dataset and
scored on the ``--split`` tasks (``eval`` by default) of every N.

Systems (``--systems``; default: all but SASRec, the slowest):

- ``random``, ``popularity``, ``itemknn``, ``sasrec``: as the evaluation stage fits them
  (``stages.evaluation.fitted_recommender``; SASRec as the tool index trains it, with the
  profile's ``tool_indexes.sasrec_train_windows``);
- ``bprmf``: the tool indexes' CF model, trained as ``tools.build_all`` trains it (the
  profile's ``tool_indexes`` BPR config); ``bprmf_untuned``: the same code with the defaults
  it had before they were tuned (``recommenders.bprmf.UNTUNED_CONFIG``);
- ``implicit_bpr``, ``implicit_als``, ``implicit_itemknn``: the ``implicit`` library
  (``recommenders/implicit_models.py``), for a hand-written vs library comparison.

Printed: the fit seconds of each system, a Markdown table per dataset and N (NDCG@1/5/10 per
group, mean [95% bootstrap CI]; its first line states N), and one NDCG@10 overview of every
system, dataset, group and N. ``--seed`` (default: the profile's ``evaluation.seed``) drives
tie-breaking, the bootstrap and the seeded recommenders. Nothing is tuned on eval tasks: the
tuned defaults (BPR-MF's, the library models', SASRec's) were picked on *valid* tasks (run
with ``--split valid`` to see those).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from recthinker_dagster.artifacts import ArtifactLayout, read_tasks, read_train_interactions
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.evaluation.report import plot_ndcg_by_system, results_table_markdown
from recthinker_dagster.recommenders.base import Recommender
from recthinker_dagster.recommenders.bprmf import BPRMF, UNTUNED_CONFIG
from recthinker_dagster.recommenders.registry import LIBRARY_BASELINES, make_recommender
from recthinker_dagster.settings import CLASSICAL_SYSTEMS, EvaluationSettings, Profile
from recthinker_dagster.stages.evaluation import fitted_recommender
from recthinker_dagster.stages.inputs import ensure_tasks
from recthinker_dagster.tools import index_interactions

SYSTEMS = (*(s for s in CLASSICAL_SYSTEMS if s != "fusion"), "bprmf_untuned", *LIBRARY_BASELINES)  # fusion: the tool suite's
DEFAULT_SYSTEMS = ["random", "popularity", "itemknn", "bprmf_untuned", "bprmf", *LIBRARY_BASELINES]



def fit_system(name: str, visible: pl.DataFrame, profile: Profile, settings: EvaluationSettings) -> Recommender:
    """``name`` fitted on the index interactions (see the module docstring)."""
    if name == "bprmf":
        return BPRMF(profile.tool_indexes.index_config().bpr).fit(visible)
    if name == "bprmf_untuned":
        return BPRMF(replace(UNTUNED_CONFIG, seed=profile.tool_indexes.index_config().bpr.seed)).fit(visible)
    if name in LIBRARY_BASELINES:
        return make_recommender(name).fit(visible)
    if name == "sasrec":  # the tool index's SASRec, trained as the profile's tool_indexes say
        config = profile.tool_indexes.index_config()
        return make_recommender(name, train_windows=config.sasrec_train_windows, seed=config.sasrec_seed).fit(visible)
    return fitted_recommender(name, visible, None, settings)


def benchmark(layouts: dict[int, ArtifactLayout], dataset: str, systems: list[str], split: str, profile: Profile,
              settings: EvaluationSettings, plot_dir: Path | None) -> dict[tuple[str, int, str], str]:
    """Fit every system once, score it on each N's tasks; returns ``{(system, N, group): NDCG@10 cell}``
    and ``{(system, 0, "fit seconds"): seconds}``."""
    tasks = {n: read_tasks(layout, dataset, (split,)) for n, layout in layouts.items()}
    visible = {n: index_interactions(read_train_interactions(layout, dataset), read_tasks(layout, dataset))
               for n, layout in layouts.items()}
    first = next(iter(visible.values()))
    if not all(v.equals(first) for v in visible.values()):
        raise RuntimeError(f"{dataset}: the index interactions differ between candidate counts {list(layouts)}")
    sizes = dict(next(iter(tasks.values())).group_by("group").len().sort("group").iter_rows())
    print(f"\n## {dataset}: {first.height} index interactions, {split} tasks per group {sizes}, "
          f"N = {' and '.join(map(str, layouts))} candidates", flush=True)
    summaries: dict[int, dict] = {n: {} for n in layouts}
    cells = {}
    for name in systems:
        started = time.perf_counter()
        model = fit_system(name, first, profile, settings)
        fitted = time.perf_counter() - started
        for n, frame in tasks.items():
            per_task = evaluate_recommender(model, frame, seed=settings.seed)
            summaries[n][name] = summarize(per_task, n_resamples=settings.n_bootstrap, seed=settings.seed)
        cells[(name, 0, "fit seconds")] = f"{fitted:.1f}"
        note = " (the tool indexes' CF model)" if name == "bprmf" else ""
        print(f"- {name}: fit {fitted:.1f} s{note}, scoring {time.perf_counter() - started - fitted:.1f} s",
              flush=True)
    for n, by_system in summaries.items():
        print(f"\n### {dataset}, {split} tasks, N = {n}\n\n"
              f"{results_table_markdown(by_system, metrics=('ndcg@1', 'ndcg@5', 'ndcg@10'), n_candidates=n)}",
              flush=True)
        if plot_dir is not None:
            path = plot_ndcg_by_system(by_system, plot_dir / f"ndcg10_{dataset}_n{n}.png",
                                       title=f"{dataset} ({split}): NDCG@10, 95% CI", n_candidates=n)
            print(f"plot: {path}")
        for name, summary in by_system.items():
            for row in summary.iter_rows(named=True):
                cells[(name, n, row["group"])] = f"{row['ndcg@10']:.3f}"
    return cells


def overview(cells: dict[tuple[str, str, int, str], str], systems: list[str], split: str) -> str:
    """One Markdown table: fit seconds and NDCG@10 per system (rows) and dataset, group and N (columns)."""
    columns = list(dict.fromkeys((d, n, g) for _, d, n, g in cells))  # datasets, N and groups as run
    header = ["system", *(f"{d} {g}" if n == 0 else f"{d} {g} N={n}" for d, n, g in columns)]
    lines = [f"NDCG@10 on the {split} tasks (mean; N = candidates per task) and fit seconds", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([s, *(cells.get((s, *c), "") for c in columns)]) + " |" for s in systems]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, "tool_indexes.sasrec_train_windows=5000")
    parser.add_argument("--n-candidates", nargs="+", type=int, default=[20, 10], help="candidates per task (N)")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, help="project root for the artifacts, one n<N> folder per N "
                                                  "(default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    parser.add_argument("--split", default="eval", choices=["eval", "valid"])
    parser.add_argument("--seed", type=int, help="tie-breaking and bootstrap seed (default: the profile's)")
    parser.add_argument("--plot-dir", type=Path, default=None, help="also write NDCG@10 PNGs here")
    args = parser.parse_args(argv)
    profile = profile_from_args(args)
    settings = profile.evaluation if args.seed is None else replace(profile.evaluation, seed=args.seed)

    cells = {}
    with tempfile.TemporaryDirectory(prefix="benchmark-baselines-") as scratch:
        base = (args.root or Path(scratch)).resolve()
        layouts = {n: ArtifactLayout(base / f"n{n}", data_dir=args.data_dir) for n in args.n_candidates}
        for dataset in args.datasets:
            for n, layout in layouts.items():
                ensure_tasks(replace(profile, protocol=replace(profile.protocol, n_candidates=n)), layout, dataset)
            found = benchmark(layouts, dataset, args.systems, args.split, profile, settings, args.plot_dir)
            cells.update({(s, dataset, n, g): v for (s, n, g), v in found.items()})
    print(f"\n## Overview\n\n{overview(cells, args.systems, args.split)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
