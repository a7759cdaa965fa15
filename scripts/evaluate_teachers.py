"""Evaluate the scripted investigator teacher against popularity, item-kNN and BPR-MF.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/evaluate_teachers.py [--profile demo]
        [--set SECTION.FIELD=VALUE] [--data-dir DIR] [--root DIR] [--datasets ml-1m amazon-cds]
        [--splits train valid] [--tune [--tune-iterations 300]] [--json-out FILE]

For each dataset the pipeline's stages (``stages.ingest``, ``stages.splits``, ``stages.indexes``,
with the profile's settings; ``--set`` overrides one) publish the tables, tasks and tool
indexes under ``--root`` (default: a temporary directory; a root that already holds them,
e.g. ``--root .`` after ``dvc pull``, is read as it is) from the raw files in ``--data-dir``
(default ``$RECTHINKER_SHARED_DATA``, else ``shared/data`` next to the repository). The
scripted teacher then runs through the real agent loop on the ``--splits`` tasks with the
evaluation stage's budgets and seed, next to popularity, item-kNN and BPR-MF fitted as that
stage fits them (``stages.evaluation.fitted_recommender``: on the index interactions, the
data the tools see). The script prints, per split and group, NDCG@1/5/10 (mean, and the 95%
bootstrap interval of NDCG@10), the teacher's tool-call histogram and its throughput.

``--tune`` first tunes the fusion weights on the *train* tasks of all datasets
(``teachers/tuning.py``) and reports with the tuned weights; eval tasks are never used for
tuning (``--splits eval`` only reports).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import FusionWeights, ScriptedTeacher, tuning
from recthinker_dagster.artifacts import (
    TASK_SPLITS,
    ArtifactLayout,
    load_tool_indexes,
    read_tasks,
    read_train_interactions,
)
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.settings import EvaluationSettings, Profile
from recthinker_dagster.stages.evaluation import fitted_recommender
from recthinker_dagster.stages.inputs import ensure_tool_inputs
from recthinker_dagster.tools import index_interactions

METRICS = ["ndcg@1", "ndcg@5", "ndcg@10"]
BASELINES = ("popularity", "itemknn", "bprmf")



def prepare(profile: Profile, layout: ArtifactLayout, dataset: str, splits: set[str]):
    """Tasks of ``splits``, tool indexes and the fitted baselines of one dataset, read back from ``layout``."""
    started = time.perf_counter()
    ensure_tool_inputs(profile, layout, dataset)
    indexes = load_tool_indexes(layout, dataset)
    visible = index_interactions(read_train_interactions(layout, dataset), read_tasks(layout, dataset))
    baselines = {s: fitted_recommender(s, visible, indexes, profile.evaluation) for s in BASELINES}
    frame = read_tasks(layout, dataset, [s for s in TASK_SPLITS if s in splits])
    print(f"{dataset}: {frame.height} tasks, indexes and baselines ready in {time.perf_counter() - started:.1f} s",
          flush=True)
    return frame, indexes, baselines


def run_teacher(teacher: ScriptedTeacher, frame: pl.DataFrame, indexes, settings: EvaluationSettings
                ) -> tuple[pl.DataFrame, dict]:
    started = time.perf_counter()
    tasks = agent_tasks(frame, indexes, prompt_history_len=settings.prompt_history_len)
    prepared = time.perf_counter()
    trajectories = teacher.run(tasks, Toolboxes(indexes), sample_index=0, seed=settings.seed)
    done = time.perf_counter()
    rows = [{"task_id": t.task_id, "split": t.split, "group": t.group, **{m: t.metrics[m] for m in METRICS}}
            for t in trajectories]
    calls = Counter(call.name for t in trajectories for call in t.tool_calls)
    stats = {
        "tasks": len(trajectories),
        "tasks_per_s": round(len(trajectories) / (done - prepared), 1),
        "prepare_s": round(prepared - started, 2),
        "valid_rate": float(np.mean([t.valid for t in trajectories])),
        "calls_per_task": round(sum(calls.values()) / max(len(trajectories), 1), 2),
        "tool_calls": dict(calls.most_common()),
        "turns": dict(Counter(t.n_turns for t in trajectories)),
    }
    return pl.DataFrame(rows), stats


def report(name: str, per_system: dict[str, pl.DataFrame], settings: EvaluationSettings) -> list[dict]:
    """Print one Markdown table per dataset; return its rows."""
    rows = []
    for system, frame in per_system.items():
        summary = summarize(frame, by=("split", "group"), metrics=METRICS, n_resamples=settings.n_bootstrap,
                            seed=settings.seed)
        rows += [{"dataset": name, "system": system, **row} for row in summary.iter_rows(named=True)]
    rows.sort(key=lambda r: (r["split"] != "train", r["group"] != "sparse", list(per_system).index(r["system"])))
    print(f"\n### {name}\n")
    print("| split | group | system | n | NDCG@1 | NDCG@5 | NDCG@10 [95% CI] |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['split']} | {r['group']} | {r['system']} | {r['n_tasks']} | {r['ndcg@1']:.3f} | "
              f"{r['ndcg@5']:.3f} | {r['ndcg@10']:.3f} [{r['ndcg@10_lo']:.3f}, {r['ndcg@10_hi']:.3f}] |")
    return rows


def evaluate(args: argparse.Namespace, profile: Profile, layout: ArtifactLayout) -> None:
    settings = profile.evaluation
    needed = set(args.splits) | ({"train"} if args.tune else set())
    worlds = {name: prepare(profile, layout, name, needed) for name in args.datasets}
    teacher = ScriptedTeacher(config=AgentConfig(max_turns=settings.max_turns, max_tool_calls=settings.max_tool_calls))
    if args.tune:
        cases = []
        for frame, indexes, _ in worlds.values():
            train = frame.filter(pl.col("split") == "train")
            factory = Toolboxes(indexes)
            cases += [tuning.gather(task, factory(task), teacher)
                      for task in agent_tasks(train, indexes, prompt_history_len=settings.prompt_history_len)]
        weights, value = tuning.tune(cases, teacher.settings, iterations=args.tune_iterations, seed=settings.seed)
        print(f"tuned on {len(cases)} train tasks (objective {value:.4f}): {weights}")
        teacher = ScriptedTeacher(config=teacher.config, weights=weights)

    datasets: dict[str, dict] = {}
    for name, (frame, indexes, baselines) in worlds.items():
        frame = frame.filter(pl.col("split").is_in(args.splits))
        per_task, stats = run_teacher(teacher, frame, indexes, settings)
        per_system = {"teacher": per_task}
        for system, model in baselines.items():
            per_system[system] = evaluate_recommender(model, frame, seed=settings.seed).select(
                "task_id", "split", "group", *METRICS)
        rows = report(name, per_system, settings)
        print(f"\nteacher: {stats['tasks']} tasks at {stats['tasks_per_s']} tasks/s "
              f"(prompt preparation {stats['prepare_s']} s), valid {stats['valid_rate']:.0%}, "
              f"{stats['calls_per_task']} calls per task, turns {stats['turns']}")
        print(f"tool calls: {stats['tool_calls']}")
        datasets[name] = {"teacher": stats, "table": rows}
    if args.json_out:
        results = {"profile": profile.name, "weights": teacher.weights.to_dict(), "datasets": datasets}
        args.json_out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nfusion weights: {json.dumps(teacher.weights.to_dict())}"
          + ("" if args.tune else f" (defaults: {FusionWeights() == teacher.weights})"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_profile_arguments(parser, "protocol.n_train_users_per_group=50")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, help="project root for the artifacts (default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--splits", nargs="+", default=["train", "valid"], choices=list(TASK_SPLITS))
    parser.add_argument("--tune", action="store_true", help="tune the fusion weights on the train tasks first")
    parser.add_argument("--tune-iterations", type=int, default=300)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    profile = profile_from_args(args)
    with tempfile.TemporaryDirectory(prefix="evaluate-teachers-") as scratch:
        evaluate(args, profile, ArtifactLayout((args.root or Path(scratch)).resolve(), data_dir=args.data_dir))


if __name__ == "__main__":
    main()
