"""Evaluate the scripted investigator teacher against popularity, item-kNN and BPR-MF.

    .venv/bin/python scripts/evaluate_teachers.py [--data-dir DIR] [--datasets ml-1m amazon-cds]
        [--splits train valid] [--tune [--tune-iterations 300]] [--json-out FILE]

For each dataset: load it from ``--data-dir`` (default ``$RECTHINKER_SHARED_DATA``, else
``shared/data`` next to the repository), build the tasks with the protocol defaults, the
index interactions and the five tool indexes (``build_all``, as the pipeline does), then run
the scripted teacher through the real agent loop on the ``--splits`` tasks and print, per
split and group, NDCG@1/5/10 (mean, and the 95% bootstrap interval of NDCG@10) next to
popularity, item-kNN and BPR-MF (the CF model inside the tool indexes) on the same tasks,
plus the teacher's tool-call histogram and throughput.

Every baseline is fitted on the index interactions, the data the teacher's tools see (for
train tasks, ``train_interactions`` would still hold the targets). ``--tune`` first tunes the
fusion weights on the *train* tasks of all datasets (``teachers/tuning.py``) and reports with
the tuned weights; eval tasks are never used for tuning (``--splits eval`` only reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks  # noqa: E402
from recthinker_dagster.agent.teachers import FusionWeights, ScriptedTeacher  # noqa: E402
from recthinker_dagster.agent.teachers import tuning  # noqa: E402
from recthinker_dagster.data.sources import load_dataset  # noqa: E402
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize  # noqa: E402
from recthinker_dagster.protocol import build_task_splits, protocol_config_for  # noqa: E402
from recthinker_dagster.recommenders.itemknn import ItemKNN  # noqa: E402
from recthinker_dagster.recommenders.popularity import Popularity  # noqa: E402
from recthinker_dagster.tools import build_all, index_interactions  # noqa: E402

METRICS = ["ndcg@1", "ndcg@5", "ndcg@10"]


def default_data_dir() -> Path:
    return Path(os.environ.get("RECTHINKER_SHARED_DATA", REPO.parent / "shared" / "data"))


def prepare(name: str, data_dir: Path, splits: list[str]):
    """Tasks of ``splits``, tool indexes and the fitted baselines of one dataset."""
    started = time.perf_counter()
    data, _ = load_dataset(name, data_dir, allow_download=False)
    task_splits = build_task_splits(data.interactions, protocol_config_for(name), name)
    visible = index_interactions(task_splits.train_interactions, task_splits.tasks)
    valid = task_splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(visible, data.items, data.users, valid)
    frame = task_splits.tasks.filter(pl.col("split").is_in(splits))
    baselines = {"popularity": Popularity().fit(visible), "itemknn": ItemKNN().fit(visible), "bprmf": indexes.bprmf}
    print(f"{name}: {frame.height} tasks, indexes and baselines built in {time.perf_counter() - started:.1f} s",
          flush=True)
    return frame, indexes, baselines


def run_teacher(teacher: ScriptedTeacher, frame: pl.DataFrame, indexes) -> tuple[pl.DataFrame, dict]:
    started = time.perf_counter()
    tasks = agent_tasks(frame, indexes)
    prepared = time.perf_counter()
    trajectories = teacher.run(tasks, TaskToolboxes(indexes, frame))
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


def report(name: str, per_system: dict[str, pl.DataFrame]) -> list[dict]:
    """Print one Markdown table per dataset; return its rows."""
    rows = []
    for system, frame in per_system.items():
        for row in summarize(frame, by=("split", "group"), metrics=METRICS).iter_rows(named=True):
            rows.append({"dataset": name, "system": system, **row})
    rows.sort(key=lambda r: (r["split"] != "train", r["group"] != "sparse", list(per_system).index(r["system"])))
    print(f"\n### {name}\n")
    print("| split | group | system | n | NDCG@1 | NDCG@5 | NDCG@10 [95% CI] |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['split']} | {r['group']} | {r['system']} | {r['n_tasks']} | {r['ndcg@1']:.3f} | "
              f"{r['ndcg@5']:.3f} | {r['ndcg@10']:.3f} [{r['ndcg@10_lo']:.3f}, {r['ndcg@10_hi']:.3f}] |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--splits", nargs="+", default=["train", "valid"], choices=["train", "valid", "eval"])
    parser.add_argument("--tune", action="store_true", help="tune the fusion weights on the train tasks first")
    parser.add_argument("--tune-iterations", type=int, default=300)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    worlds = {name: prepare(name, args.data_dir, sorted(set(args.splits) | ({"train"} if args.tune else set())))
              for name in args.datasets}
    teacher = ScriptedTeacher()
    if args.tune:
        cases = []
        for frame, indexes, _ in worlds.values():
            train = frame.filter(pl.col("split") == "train")
            factory = TaskToolboxes(indexes, train)
            cases += [tuning.gather(task, factory(task), teacher) for task in agent_tasks(train, indexes)]
        weights, value = tuning.tune(cases, teacher.settings, iterations=args.tune_iterations)
        print(f"tuned on {len(cases)} train tasks (objective {value:.4f}): {weights}")
        teacher = ScriptedTeacher(weights=weights)

    results = {"weights": teacher.weights.to_dict(), "datasets": {}}
    for name, (frame, indexes, baselines) in worlds.items():
        frame = frame.filter(pl.col("split").is_in(args.splits))
        per_task, stats = run_teacher(teacher, frame, indexes)
        per_system = {"teacher": per_task}
        for system, model in baselines.items():
            per_system[system] = evaluate_recommender(model, frame).select("task_id", "split", "group", *METRICS)
        rows = report(name, per_system)
        print(f"\nteacher: {stats['tasks']} tasks at {stats['tasks_per_s']} tasks/s "
              f"(prompt preparation {stats['prepare_s']} s), valid {stats['valid_rate']:.0%}, "
              f"{stats['calls_per_task']} calls per task, turns {stats['turns']}")
        print(f"tool calls: {stats['tool_calls']}")
        results["datasets"][name] = {"teacher": stats, "table": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nfusion weights: {json.dumps(teacher.weights.to_dict())}"
          + ("" if args.tune else f" (defaults: {FusionWeights() == teacher.weights})"))


if __name__ == "__main__":
    main()
