"""Validation of a policy (base model plus adapters) on fixed slices of validation tasks.

    suites = [ValidationSuite("ml-1m", tasks, Toolboxes(indexes)), ...]
    report = evaluate_policy("assets/base_model", ["assets/sft_model/adapter"], suites, AgentConfig())
    report["overall"]["ndcg@10"], report["by_dataset"]["ml-1m"]["valid_rate"]

The model is loaded once and every dataset's slice runs through the real agent loop and tools
in batches. ``validation_slice`` picks the same tasks for every policy, so the SFT and RL stages
compare like with like.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.metrics import bootstrap_ci, target_rank
from recthinker_dagster.models.loading import adapter_list, load_agent_model


@dataclass
class ValidationSuite:
    dataset: str
    tasks: list  # AgentTask objects
    toolbox_factory: Callable


def validation_slice(tasks: pl.DataFrame, n_tasks: int) -> pl.DataFrame:
    """``n_tasks`` tasks spread evenly over the groups, in task-id order (deterministic).

    With ``n_tasks`` <= 0 or at least the table's size, every task."""
    if n_tasks <= 0 or n_tasks >= tasks.height:
        return tasks.sort("task_id")
    groups = sorted(tasks["group"].unique().to_list(), reverse=True)  # "sparse" before "dense"
    per_group, extra = divmod(n_tasks, len(groups))
    parts = [
        tasks.filter(pl.col("group") == group).sort("task_id").head(per_group + (1 if i < extra else 0))
        for i, group in enumerate(groups)
    ]
    return pl.concat(parts)


def summarize_trajectories(trajectories: Sequence[Trajectory]) -> dict:
    """Mean ranking metrics, the valid-answer rate and tool use over a set of trajectories."""
    n = len(trajectories)
    if not n:
        return {"n_tasks": 0}

    def mean(values):
        return round(statistics.fmean(values), 4)

    summary = {"n_tasks": n}
    for key in ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"):
        summary[key] = mean(t.metrics.get(key, 0.0) for t in trajectories)
    summary.update(
        valid_rate=mean(t.valid for t in trajectories),
        answered_rate=mean(t.finish == "answer" for t in trajectories),
        repaired_rate=mean(t.repaired for t in trajectories),
        forced_head_rate=mean(t.finish == "forced_head" for t in trajectories),
        valid_tool_call_rate=mean(any(call.ok for call in t.tool_calls) for t in trajectories),  # >= 1 valid call
        tool_calls_per_task=mean(t.n_tool_calls for t in trajectories),
        invalid_calls_per_task=mean(t.n_invalid_calls for t in trajectories),
        turns_per_task=mean(t.n_turns for t in trajectories),
        completion_tokens_per_task=mean(t.completion_tokens for t in trajectories),
    )
    return summary


def evaluate_policy(
    base_model_dir: str | os.PathLike,
    adapter_dirs,
    suites: Sequence[ValidationSuite],
    agent_config=None,
    *,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """NDCG@1/5/10, HR, MRR, valid-answer rate and tool calls per task, per dataset and overall.

    ``adapter_dirs``: None (the base model as shipped), one adapter folder or several (merged in
    order). Returns ``{"overall": summary, "by_dataset": {dataset: summary}, "producer", "seconds",
    "per_task"}`` with summaries from :func:`summarize_trajectories`; ``per_task`` lists every
    task's id, NDCG@10, tool calls, target rank and answer labels (:func:`task_row`; paired
    comparisons: :func:`paired_difference`)."""
    from recthinker_dagster.agent import AgentConfig, run_agent
    from recthinker_dagster.agent.backends.transformers_backend import (
        TransformersBackend,
    )

    model, tokenizer = load_agent_model(base_model_dir, adapter_dirs, dtype=dtype, device=device)
    adapters = adapter_list(adapter_dirs)
    producer = "+".join(a.parent.name for a in adapters) if adapters else "base_model"
    backend = TransformersBackend(model, tokenizer, name=producer, batch_size=batch_size)
    config = agent_config or AgentConfig()
    return suite_report(producer, suites, lambda suite: run_agent(suite.tasks, backend, suite.toolbox_factory, config),
                        progress)


def teacher_report(suites: Sequence[ValidationSuite], agent_config=None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """The scripted teacher on the same slices, as :func:`evaluate_policy` reports a policy (the
    bar a trained agent is held to: within a few points of the teacher it learned from)."""
    from recthinker_dagster.agent.teachers import ScriptedTeacher

    teacher = ScriptedTeacher(agent_config)
    return suite_report("teacher", suites, lambda suite: teacher.run(suite.tasks, suite.toolbox_factory), progress)


def suite_report(producer: str, suites: Sequence[ValidationSuite], run: Callable[[ValidationSuite], list],
                 progress: Callable[[str], None] | None = None) -> dict:
    """The report of ``run`` (a suite to its trajectories) over every suite: per dataset, overall, per task."""
    started = time.perf_counter()
    everything, by_dataset = [], {}
    for suite in suites:
        suite_started = time.perf_counter()
        trajectories = run(suite)
        by_dataset[suite.dataset] = {**summarize_trajectories(trajectories),
                                     "seconds": round(time.perf_counter() - suite_started, 2)}
        everything.extend(trajectories)
        if progress is not None:
            progress(f"{producer} on {suite.dataset}: {by_dataset[suite.dataset]}")
    return {
        "producer": producer,
        "overall": summarize_trajectories(everything),
        "by_dataset": by_dataset,
        "seconds": round(time.perf_counter() - started, 2),
        "per_task": [task_row(t) for t in everything],
    }


def task_row(trajectory) -> dict:
    """One task of a report: its NDCG@10 and tool calls (for :func:`paired_difference`), the
    target's rank (1: first), and the answer's labels and items, best first, so a bias towards
    some labels shows in the report itself (and :func:`ranking_agreement` compares the items)."""
    rank = target_rank(trajectory.final_ranking, trajectory.target_item_id)  # 0-based
    return {"task_id": trajectory.task_id, "dataset": trajectory.dataset,
            "ndcg@10": trajectory.metrics.get("ndcg@10", 0.0), "tool_calls": trajectory.n_tool_calls,
            "target_rank": rank + 1 if rank is not None else None, "labels": list(trajectory.final_labels),
            "item_ids": list(trajectory.final_ranking)}


def kendall_tau(ranking: Sequence, other: Sequence) -> float:
    """Kendall's tau between two rankings of the same items: 1 same order, -1 reversed."""
    position = {item: i for i, item in enumerate(other)}
    placed = [position[item] for item in ranking]
    pairs = [(a, b) for i, a in enumerate(placed) for b in placed[i + 1:]]
    if not pairs:
        return 1.0
    return sum(1 if a < b else -1 for a, b in pairs) / len(pairs)


def ranking_agreement(report: Mapping, baseline: Mapping) -> dict:
    """How alike two reports rank the items of the tasks both scored (``per_task`` rows with
    ``item_ids``): the share with the same first item, the share with the same whole ranking,
    and the mean Kendall tau. Scored on the same tasks in two candidate orders, it measures how
    much a policy's ranking depends on where the items stand rather than on what they are."""
    theirs = {row["task_id"]: row.get("item_ids") for row in baseline.get("per_task", [])}
    pairs = [(row["item_ids"], theirs[row["task_id"]]) for row in report.get("per_task", [])
             if row.get("item_ids") and theirs.get(row["task_id"]) and set(row["item_ids"]) == set(theirs[row["task_id"]])]
    if not pairs:
        return {"n_tasks": 0}
    return {"n_tasks": len(pairs),
            "same_first": round(statistics.fmean(a[0] == b[0] for a, b in pairs), 4),
            "same_ranking": round(statistics.fmean(a == b for a, b in pairs), 4),
            "kendall_tau": round(statistics.fmean(kendall_tau(a, b) for a, b in pairs), 4)}


def paired_difference(report: Mapping, baseline: Mapping, key: str = "ndcg@10", *, seed: int = 0) -> dict:
    """``report`` minus ``baseline`` on the tasks both scored (``per_task``): the mean difference
    of ``key`` with its 95% bootstrap interval, and the task count."""
    theirs = {row["task_id"]: row[key] for row in baseline.get("per_task", [])}
    diffs = [row[key] - theirs[row["task_id"]] for row in report.get("per_task", []) if row["task_id"] in theirs]
    if not diffs:
        return {"n_tasks": 0}
    low, high = bootstrap_ci(diffs, seed=seed)
    return {"n_tasks": len(diffs), "mean": round(statistics.fmean(diffs), 4), "ci95": [round(low, 4), round(high, 4)]}
