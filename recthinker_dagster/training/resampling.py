"""Did a GRPO run improve its policy on its own tasks? Resample the start and the trained policy.

    start = resampled_groups(start_model, rollout, recipe, steps=[100, 101, 102, 103])
    trained = resampled_groups(trained_model, rollout, recipe, steps=[100, 101, 102, 103])
    compare_resampled(start, trained)   # per policy figures, trained minus start with a 95% CI
    merge_resamplings([first, second])  # two saved resamplings of one run at other step seeds, pooled

A run's reward curve compares different draws. Step 1's rollouts and step 10's are other
samples of other policies, and with groups of 8 at temperature 1.0-1.2 the same policy's step
means differ by up to 0.2 (measured: docs/training.md, "Resampling"). So a rise between the
first and the last quarter of a 10-step run can be the draws. Here both policies are sampled
on the same tasks, at the same step seeds (pick ones the run never used), as GRPO samples a
group, and compared group by group: what is left of the difference is the policy.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from recthinker_dagster.metrics import bootstrap_ci
from recthinker_dagster.training.rewards import RolloutOutcome, weighted_reward

FIGURES = ("reward", "ndcg@10", "answered", "failed_calls", "tool_calls")


@dataclass(frozen=True)
class GRPORun:
    """What resampling needs to know of a finished GRPO run."""

    recipe: dict               # the recipe as trained, every override included
    answer_mode: str
    task_ids: list[str]        # the tasks it trained on
    start_adapters: list[Path]  # the start policy's adapters on the base model (empty: the base model)
    trained_adapter: Path
    prompt_history_len: int


def read_grpo_run(run: Path, root: Path) -> GRPORun:
    """A ``scripts/grpo_signal.py`` ``--out`` folder (``grpo_signal.json``, ``run/adapter``) or a
    published ``rl_model`` asset folder (``metrics.json``, ``lineage.json``, ``validation.json``,
    ``adapter/``; the start adapters its lineage names are relative to the pipeline ``root``)."""
    signal = run / "grpo_signal.json"
    if signal.exists():
        record = json.loads(signal.read_text())
        return GRPORun(record["recipe"], record.get("answer_mode", "generate"), _trained_task_ids(record),
                       [Path(record["sft_adapter"])] if record.get("sft_adapter") else [],
                       _existing(run / "run" / "adapter"), record.get("prompt_history_len", 10))
    asset_files = [run / name for name in ("metrics.json", "lineage.json", "validation.json")]
    if not all(path.exists() for path in asset_files):
        raise FileNotFoundError(
            f"{run} is neither a scripts/grpo_signal.py --out folder (no grpo_signal.json) nor a published "
            f"rl_model folder (missing {', '.join(p.name for p in asset_files if not p.exists())})")
    metrics, lineage, validation = (json.loads(path.read_text()) for path in asset_files)
    start = lineage["adapters"][:-1]  # the last is this folder's own adapter
    return GRPORun(metrics["recipe_config"], metrics.get("answer_mode", "generate"), _trained_task_ids(metrics),
                   [root / adapter for adapter in start], _existing(run / "adapter"),
                   validation["settings"]["prompt_history_len"])


def _trained_task_ids(record: Mapping) -> list[str]:
    return sorted({visit["task_id"] for visit in record["task_visits"]})


def _existing(adapter: Path) -> Path:
    if not adapter.exists():
        raise FileNotFoundError(f"{adapter} is missing: resampling needs the run's trained adapter")
    return adapter


def resampled_groups(model, rollout, recipe, steps: Sequence[int]) -> list[dict]:
    """One group per task and step: ``recipe.num_generations`` rollouts of ``model``, sampled by
    ``rollout`` (a ``training.grpo.ToolRollout``) at the recipe's temperature with the step's
    seed, each with the recipe's weighted reward and what it is made of."""
    import torch

    prompts = [row["prompt"] for row in rollout.dataset_rows() for _ in range(recipe.num_generations)]
    groups: list[dict] = []
    for step in steps:
        trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=step),
                                  args=SimpleNamespace(temperature=recipe.temperature, top_p=recipe.top_p))
        with torch.no_grad():
            batch = rollout(prompts, trainer)
        by_task: dict[str, dict] = {}
        # the outcomes the rollout computed, under its own agent budgets, as the trainer's rewards get them
        for trajectory, scored in zip(rollout.last_trajectories, batch["outcome"], strict=True):
            outcome = RolloutOutcome(**scored)
            group = by_task.setdefault(trajectory.task_id, {"step": step, "task_id": trajectory.task_id,
                                                            **{name: [] for name in FIGURES}})
            group["reward"].append(weighted_reward(outcome, recipe.reward_weights, recipe.reward_params))
            group["ndcg@10"].append(trajectory.metrics.get("ndcg@10", 0.0))
            group["answered"].append(float(outcome.answered))
            group["failed_calls"].append(float(outcome.n_invalid_calls))
            group["tool_calls"].append(float(outcome.n_tool_calls))
        groups.extend(by_task.values())
    return groups


def summarize_groups(groups: Sequence[Mapping]) -> dict:
    """Means over every rollout, and the reward's standard error over the groups' means."""
    summary: dict = {name: round(statistics.fmean(v for g in groups for v in g[name]), 4) for name in FIGURES}
    means = [statistics.fmean(g["reward"]) for g in groups]
    summary["reward_se"] = round(statistics.stdev(means) / len(means) ** 0.5, 4) if len(means) > 1 else None
    summary["rollouts"] = sum(len(g["reward"]) for g in groups)
    return summary


def compare_resampled(start: Sequence[Mapping], trained: Sequence[Mapping], *, seed: int = 0) -> dict:
    """Both policies' figures, and the trained minus the start policy's mean reward per group
    (same task, same step seed), with its 95% bootstrap interval over the groups."""
    theirs = {(g["step"], g["task_id"]): statistics.fmean(g["reward"]) for g in start}
    diffs = [statistics.fmean(g["reward"]) - theirs[(g["step"], g["task_id"])] for g in trained
             if (g["step"], g["task_id"]) in theirs]
    if not diffs:
        raise ValueError("the two resamplings share no (step, task) group: sample both at the same steps and tasks")
    low, high = bootstrap_ci(diffs, seed=seed)
    return {"start": summarize_groups(start), "trained": summarize_groups(trained),
            "trained_minus_start": {"groups": len(diffs), "mean": round(statistics.fmean(diffs), 4),
                                    "ci95": [round(low, 4), round(high, 4)]}}


def merge_resamplings(documents: Sequence[Mapping], *, seed: int = 0) -> dict:
    """One comparison over several resamplings of one run (``scripts/resample_policies.py
    --json-out`` documents) at different step seeds: their groups pooled, then compared as
    ``compare_resampled`` does. Refuses documents of other runs or tasks and repeated steps,
    which would count a draw twice."""
    if not documents:
        raise ValueError("nothing to merge: give at least one resampling")
    first = documents[0]
    seen: set[int] = set()
    start: list = []
    trained: list = []
    for index, document in enumerate(documents):
        missing = [key for key in ("run", "steps", "tasks", "groups") if key not in document]
        if missing:
            raise ValueError(f"resampling {index + 1} lacks {missing}: write it with resample_policies.py --json-out")
        for key in ("run", "tasks"):
            if document[key] != first[key]:
                raise ValueError(f"resampling {index + 1} differs from the first in its {key} ({document[key]!r}, "
                                 f"not {first[key]!r}): merge only resamplings of one run on its tasks")
        repeated = sorted(seen.intersection(document["steps"]))
        if repeated:
            raise ValueError(f"resampling {index + 1} repeats step seeds {repeated}: the same draws would count twice")
        seen.update(document["steps"])
        start.extend(document["groups"]["start"])
        trained.extend(document["groups"]["trained"])
    return {"run": first["run"], "steps": sorted(seen), "tasks": first["tasks"],
            **compare_resampled(start, trained, seed=seed), "groups": {"start": start, "trained": trained}}
