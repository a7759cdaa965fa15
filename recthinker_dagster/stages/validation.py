"""Validation of trained policies on the same slice of validation tasks (the SFT and RL stages).

    reports = validate_policies(layout, ["ml-1m"], settings.validation, base_dir,
                                {"base_model": [], "sft_model": [adapter_dir]}, log=print)
    validation_table(reports)     # Markdown: one row per policy and dataset (and overall)
    validation_metrics(reports)   # {"valid_sft_model_overall_ndcg@10": ...}

Every policy runs the real agent loop and tools on ``validation_slice`` of each dataset's
``tasks_valid`` table, with the budgets of :class:`ValidationSettings` (``conversation="think"``:
the tool-free think-before-recommend conversation of RecZero and RecOne, ``agent/think.py``); ``validation.json``
records those settings next to the reports (:func:`validation_document`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.think import think_config, without_tools
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_table
from recthinker_dagster.settings import ValidationSettings
from recthinker_dagster.training.validation import ValidationSuite, evaluate_policy, validation_slice

VALIDATION_COLUMNS = ("ndcg@1", "ndcg@5", "ndcg@10", "valid_rate", "answered_rate", "valid_tool_call_rate", "tool_calls_per_task",
                      "completion_tokens_per_task")
RECORDED_SETTINGS = ("n_tasks", "max_turns", "max_tool_calls", "max_new_tokens", "batch_size", "prompt_history_len",
                     "answer_mode", "conversation", "candidate_order")


def validation_suites(layout: ArtifactLayout, datasets: Sequence[str], settings: ValidationSettings) -> list[ValidationSuite]:
    """The same validation slice of every dataset, with its real tools."""
    suites = []
    for dataset in datasets:
        frame = validation_slice(read_table(layout, "task_splits", dataset, "tasks_valid.parquet"), settings.n_tasks)
        indexes = load_tool_indexes(layout, dataset)
        tasks = agent_tasks(frame, indexes, settings.prompt_history_len)
        if settings.candidate_order is not None:
            tasks = [task.reordered(f"{settings.candidate_order}|{task.task_id}") for task in tasks]
        factory = without_tools(Toolboxes(indexes)) if settings.conversation == "think" else Toolboxes(indexes)
        suites.append(ValidationSuite(dataset, tasks, factory))
    return suites


def validation_agent(settings: ValidationSettings) -> AgentConfig:
    if settings.conversation == "think":
        return think_config(SamplingParams(max_new_tokens=settings.max_new_tokens), answer_mode=settings.answer_mode)
    return AgentConfig(max_turns=settings.max_turns, max_tool_calls=settings.max_tool_calls,
                       sampling=SamplingParams(max_new_tokens=settings.max_new_tokens), answer_mode=settings.answer_mode)


def validate_policies(layout: ArtifactLayout, datasets: Sequence[str], settings: ValidationSettings,
                      base_dir: Path, policies: Mapping[str, list], log: Callable[[str], None] = print, *,
                      suites: Sequence[ValidationSuite] | None = None) -> dict:
    """``{name: evaluate_policy report}`` of every policy (its adapter list) on the same slice
    (``suites``: the slice's ``validation_suites``, when the caller already loaded them)."""
    if suites is None:
        suites = validation_suites(layout, datasets, settings)
    agent = validation_agent(settings)
    return {name: evaluate_policy(base_dir, adapters, suites, agent, batch_size=settings.batch_size, progress=log)
            for name, adapters in policies.items()}


def validation_document(settings: ValidationSettings, validation: Mapping) -> dict:
    """What ``validation.json`` holds: the slice's settings, then every policy's report."""
    return {"settings": recorded_settings(settings), **validation}


def recorded_settings(settings: ValidationSettings) -> dict:
    return {name: getattr(settings, name) for name in RECORDED_SETTINGS}


def saved_report(path: Path, policy: str, settings: ValidationSettings, suites: Sequence[ValidationSuite]) -> dict | None:
    """``policy``'s report from a published ``validation.json`` when it scored exactly this
    slice (same settings, same task ids), else None: the RL stage then need not score its start
    policy again, which its SFT stage already did."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    report = document.get(policy)
    if document.get("settings") != recorded_settings(settings) or not isinstance(report, dict):
        return None
    scored = sorted((row.get("dataset"), row.get("task_id")) for row in report.get("per_task", []))
    wanted = sorted((suite.dataset, task.task_id) for suite in suites for task in suite.tasks)
    return report if scored == wanted else None


def validation_table(validation: Mapping) -> str:
    """Markdown: one row per policy and dataset (and overall); a column a report lacks shows "–"."""
    rows = ["| policy | dataset | tasks | " + " | ".join(VALIDATION_COLUMNS) + " |",
            "|---|---|---:|" + "---:|" * len(VALIDATION_COLUMNS)]
    for policy, report in validation.items():
        for dataset, summary in [*report["by_dataset"].items(), ("overall", report["overall"])]:
            values = " | ".join(f"{summary[c]:.3f}" if c in summary else "–" for c in VALIDATION_COLUMNS)
            rows.append(f"| {policy} | {dataset} | {summary.get('n_tasks', 0)} | {values} |")
    return "\n".join(rows)


def validation_metrics(validation: Mapping) -> dict[str, float]:
    """``valid_<policy>_<overall|dataset>_<column>`` for every reported column."""
    metrics = {}
    for policy, report in validation.items():
        for scope, summary in [("overall", report["overall"]), *report["by_dataset"].items()]:
            for name in VALIDATION_COLUMNS:
                if name in summary:
                    metrics[f"valid_{policy}_{scope}_{name}"] = summary[name]
    return metrics
