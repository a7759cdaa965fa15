"""Evaluate the scripted teacher against the classical systems, and tune its weights.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/evaluate_teachers.py [--profile full]
        [--set SECTION.FIELD=VALUE] [--data-dir DIR] [--root DIR] [--datasets ml-1m amazon-cds]
        [--splits eval] [--tune [--write-weights]] [--json-out FILE]

For each dataset the pipeline's stages (``stages.ingest``, ``stages.splits``, ``stages.indexes``,
with the profile's settings; ``--set`` overrides one) publish the tables, tasks and tool
indexes under ``--root`` (default: a temporary directory; a root that already holds them is
read as it is) from the raw files in ``--data-dir``.

``--tune`` first tunes the teacher's ``score_candidates`` weights per dataset and history
regime on the **train and valid** tasks (``agent/teachers/tuning.py``); ``--write-weights``
stores them in ``agent/teachers/tuned_weights.py``, the table the teacher reads. Eval tasks
are never used for tuning.

The teacher then runs through the real agent loop on the ``--splits`` tasks, with the
evaluation stage's budgets and seed, next to popularity, item-kNN, BPR-MF and SASRec as the
evaluation stage fits them (``stages.evaluation.fitted_recommender``). The script prints per
split and group NDCG@1/5/10 with the 95% bootstrap interval of NDCG@10, and the paired
difference of the teacher and the group's best classical system (mean and 95% bootstrap CI).
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
from recthinker_dagster.agent.teachers import InvestigatorSettings, ScriptedTeacher, tuning
from recthinker_dagster.artifacts import (
    TASK_SPLITS,
    ArtifactLayout,
    load_tool_indexes,
    read_tasks,
    read_train_interactions,
)
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.metrics import bootstrap_ci
from recthinker_dagster.settings import EvaluationSettings, Profile
from recthinker_dagster.stages.evaluation import fitted_recommender
from recthinker_dagster.stages.inputs import ensure_tool_inputs
from recthinker_dagster.tools import index_interactions

METRICS = ["ndcg@1", "ndcg@5", "ndcg@10"]
BASELINES = ("popularity", "itemknn", "bprmf", "sasrec")
WEIGHTS_FILE = Path(__file__).resolve().parents[1] / "recthinker_dagster" / "agent" / "teachers" / "tuned_weights.py"


def prepare(profile: Profile, layout: ArtifactLayout, dataset: str):
    """Every task, the tool indexes and the fitted baselines of one dataset, read back from ``layout``."""
    started = time.perf_counter()
    ensure_tool_inputs(profile, layout, dataset, log=print)
    indexes = load_tool_indexes(layout, dataset)
    tasks = read_tasks(layout, dataset)
    visible = index_interactions(read_train_interactions(layout, dataset), tasks)
    baselines = {s: fitted_recommender(s, visible, indexes, profile.evaluation) for s in BASELINES}
    print(f"{dataset}: {tasks.height} tasks, indexes and baselines ready in {time.perf_counter() - started:.1f} s",
          flush=True)
    return tasks, indexes, baselines


def tune_weights(worlds: dict, settings: EvaluationSettings) -> dict:
    """The weights table tuned on every dataset's train and valid tasks."""
    cases, names = [], None
    for frame, indexes, _ in worlds.values():
        names = names or tuning.signal_names(indexes)
        fit = frame.filter(pl.col("split").is_in(["train", "valid"]))
        cases += [tuning.gather(task, indexes, names)
                  for task in agent_tasks(fit, indexes, prompt_history_len=settings.prompt_history_len)]
    table, report = tuning.tune_table(cases, names or ())
    print(f"tuned on {len(cases)} train and valid tasks (entry: [tasks, mean NDCG@10]): {json.dumps(report)}")
    print(f"weights: {json.dumps(table)}")
    return table


def write_weights(table: dict, profile: Profile) -> None:
    WEIGHTS_FILE.write_text(
        '"""Tuned ``score_candidates`` weights of the scripted teacher (``agent/teachers/fusion.py``).\n\n'
        f"Written by ``scripts/evaluate_teachers.py --profile {profile.name} --tune --write-weights``: tuned on\n"
        "the train and valid tasks of each dataset (never eval), per history regime.\n"
        '"""\n\n'
        f"TUNED: dict[str, dict[str, dict[str, float]]] = {json.dumps(table, indent=4)}\n")
    print(f"wrote {WEIGHTS_FILE}")


def run_teacher(teacher: ScriptedTeacher, frame: pl.DataFrame, indexes, settings: EvaluationSettings
                ) -> tuple[pl.DataFrame, dict]:
    started = time.perf_counter()
    tasks = agent_tasks(frame, indexes, prompt_history_len=settings.prompt_history_len)
    trajectories = teacher.run(tasks, Toolboxes(indexes), sample_index=0, seed=settings.seed)
    seconds = time.perf_counter() - started
    rows = [{"task_id": t.task_id, "split": t.split, "group": t.group, **{m: t.metrics[m] for m in METRICS}}
            for t in trajectories]
    calls = Counter(call.name for t in trajectories for call in t.tool_calls)
    stats = {
        "tasks": len(trajectories),
        "tasks_per_s": round(len(trajectories) / seconds, 1),
        "valid_rate": float(np.mean([t.valid for t in trajectories])),
        "calls_per_task": round(sum(calls.values()) / max(len(trajectories), 1), 2),
        "tool_calls": dict(calls.most_common()),
    }
    return pl.DataFrame(rows), stats


def report(name: str, per_system: dict[str, pl.DataFrame], settings: EvaluationSettings) -> list[dict]:
    """Print the Markdown table of one dataset; return its rows."""
    rows = []
    for system, frame in per_system.items():
        summary = summarize(frame, by=("split", "group"), metrics=METRICS, n_resamples=settings.n_bootstrap,
                            seed=settings.seed)
        rows += [{"dataset": name, "system": system, **row} for row in summary.iter_rows(named=True)]
    rows.sort(key=lambda r: (r["split"], r["group"] != "sparse", list(per_system).index(r["system"])))
    print(f"\n### {name}\n")
    print("| split | group | system | n | NDCG@1 | NDCG@5 | NDCG@10 [95% CI] |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['split']} | {r['group']} | {r['system']} | {r['n_tasks']} | {r['ndcg@1']:.3f} | "
              f"{r['ndcg@5']:.3f} | {r['ndcg@10']:.3f} [{r['ndcg@10_lo']:.3f}, {r['ndcg@10_hi']:.3f}] |")
    return rows


def paired_differences(name: str, per_system: dict[str, pl.DataFrame], settings: EvaluationSettings) -> list[dict]:
    """Teacher minus the best classical system of each split and group, paired by task."""
    out = []
    teacher = per_system["teacher"]
    for (split, group), mine in teacher.group_by(["split", "group"], maintain_order=True):
        scores = {}
        for system in BASELINES:
            other = per_system[system].filter((pl.col("split") == split) & (pl.col("group") == group))
            scores[system] = mine.select("task_id", "ndcg@10").join(
                other.select("task_id", pl.col("ndcg@10").alias("other")), on="task_id")
        best = max(scores, key=lambda s: scores[s]["other"].mean())
        diff = (scores[best]["ndcg@10"] - scores[best]["other"]).to_numpy()
        lo, hi = bootstrap_ci(diff, n_resamples=settings.n_bootstrap, seed=settings.seed)
        out.append({"dataset": name, "split": split, "group": group, "best": best, "n": len(diff),
                    "teacher": float(mine["ndcg@10"].mean()), "best_ndcg@10": float(scores[best]["other"].mean()),
                    "diff": float(diff.mean()), "diff_lo": lo, "diff_hi": hi})
    return out


def evaluate(args: argparse.Namespace, profile: Profile, layout: ArtifactLayout) -> None:
    settings = profile.evaluation
    worlds = {name: prepare(profile, layout, name) for name in args.datasets}
    table = None
    if args.tune:
        table = tune_weights(worlds, settings)
        if args.write_weights:
            write_weights(table, profile)
    teacher = ScriptedTeacher(config=AgentConfig(max_turns=settings.max_turns, max_tool_calls=settings.max_tool_calls),
                              settings=InvestigatorSettings(weights_table=table))
    datasets: dict[str, dict] = {}
    differences: list[dict] = []
    for name, (frame, indexes, baselines) in worlds.items():
        frame = frame.filter(pl.col("split").is_in(args.splits))
        per_task, stats = run_teacher(teacher, frame, indexes, settings)
        per_system = {"teacher": per_task}
        for system, model in baselines.items():
            per_system[system] = evaluate_recommender(model, frame, seed=settings.seed).select(
                "task_id", "split", "group", *METRICS)
        rows = report(name, per_system, settings)
        print(f"\nteacher: {stats['tasks']} tasks at {stats['tasks_per_s']} tasks/s, valid {stats['valid_rate']:.0%}, "
              f"{stats['calls_per_task']} calls per task: {stats['tool_calls']}")
        differences += paired_differences(name, per_system, settings)
        datasets[name] = {"teacher": stats, "table": rows}
    print("\n### Teacher minus the best classical system (NDCG@10, paired by task)\n")
    print("| dataset | split | group | best classical | n | teacher | best | difference [95% CI] |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for d in differences:
        print(f"| {d['dataset']} | {d['split']} | {d['group']} | {d['best']} | {d['n']} | {d['teacher']:.3f} | "
              f"{d['best_ndcg@10']:.3f} | {d['diff']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}] |")
    for split in args.splits:
        mine = [d["diff"] for d in differences if d["split"] == split]
        if mine:
            print(f"\n{split}: mean difference over {len(mine)} groups {np.mean(mine):+.4f}, "
                  f"smallest {min(mine):+.4f}")
    if args.json_out:
        results = {"profile": profile.name, "weights": table, "datasets": datasets, "differences": differences}
        args.json_out.write_text(json.dumps(results, indent=2, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_profile_arguments(parser, "protocol.n_eval_users_per_group=100")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, help="project root for the artifacts (default: a temporary directory)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--splits", nargs="+", default=["valid"], choices=list(TASK_SPLITS))
    parser.add_argument("--tune", action="store_true", help="tune the weights on the train and valid tasks first")
    parser.add_argument("--write-weights", action="store_true",
                        help="with --tune: store the tuned weights in agent/teachers/tuned_weights.py")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    profile = profile_from_args(args)
    with tempfile.TemporaryDirectory(prefix="evaluate-teachers-") as scratch:
        evaluate(args, profile, ArtifactLayout((args.root or Path(scratch)).resolve(), data_dir=args.data_dir))


if __name__ == "__main__":
    main()
