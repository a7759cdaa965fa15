"""The registration stage, without MLflow: what gets registered, and the ``registration.json`` record.

    plan = plan_registration(RegistrySettings(), layout, ["ml-1m", "amazon-cds"])
    version = log_agent_model(plan.base_model, plan.adapters, plan.tool_indexes, config=plan.serving, ...)
    artifact = write_registration(settings, layout, plan, str(version.version), version.run_id)

The figures compared are the evaluation's: NDCG@10 (by default) of each system on the LLM
subset of the frozen eval tasks, per dataset and group. The record also holds the figures of the
policy the candidate was trained from (``start``: SFT for SFT+RL, when the evaluation scored it),
which the gate holds the candidate to. The candidate is the trained policy of
``candidate_system`` (its ``lineage.json`` names its base model and adapters); the base model
and the tool indexes are referenced by path and DVC md5 (``{"path", "md5"}``), never copied
here. Logging the model and moving the registry aliases is the MLflow layer's job
(``serving/pyfunc.py``, ``serving/registry.py``); the promotion gate reads the record written
here (:func:`read_registration`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recthinker_dagster.artifacts import (
    ArtifactLayout,
    asset_label,
    index_folders,
    read_lineage,
    read_table,
    tracked_md5,
)
from recthinker_dagster.settings import RegistrySettings
from recthinker_dagster.stages.result import Json, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory

ASSET = "registered_model"
REGISTRATION = "registration.json"
POLICY_ASSET = {"sft_rl": "rl_model", "sft": "sft_model"}  # candidate system -> its trained policy
START_SYSTEM = {"sft_rl": "sft"}  # candidate system -> the evaluated policy it was trained from
SUBSET = "llm_subset"  # the summary rows compared: every system on the same eval tasks


@dataclass
class RegistrationPlan:
    """Everything the MLflow layer needs to log and register the candidate."""

    candidate: dict  # {dataset: {group: {metric: value}}} of the candidate system
    base: dict  # the same for the baseline system (the untrained base model with tools)
    lineage: dict  # the candidate policy's lineage.json
    policy_md5: str | None  # DVC md5 of the candidate policy's folder (None: untracked)
    base_model: dict  # {"path", "md5"}
    adapters: list[Path]  # merged in order
    tool_indexes: dict[str, dict[str, dict]]  # {dataset: {index name: {"path", "md5"}}}
    serving: dict  # the served agent's budgets (serving.agent.ServingConfig keys)
    input_example: list[dict]  # one request for a real eval user
    metrics: dict[str, float]  # {"<dataset>/<group>/<metric>": candidate value}
    candidate_per_task: dict[str, float]  # {"<dataset>/<group>/<task_id>": candidate value}: the paired test's input
    start_system: str | None = None  # the evaluated policy the candidate was trained from (None: none evaluated)
    start: dict | None = None  # its figures, as ``candidate``
    start_per_task: dict[str, float] | None = None  # its per-task scores, as ``candidate_per_task``


def summary_rows(layout: ArtifactLayout, dataset: str, system: str) -> pl.DataFrame:
    """The evaluation summary's rows of ``system`` on the LLM subset of ``dataset``'s eval tasks."""
    path = layout.asset_dir("evaluation", dataset) / "summary.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {asset_label('evaluation', dataset)} first")
    return pl.read_parquet(path).filter((pl.col("system") == system) & (pl.col("tasks") == SUBSET))


def system_figures(layout: ArtifactLayout, datasets: Sequence[str], system: str, metric: str) -> dict:
    """``{dataset: {group: {metric: value}}}`` of ``system`` on the LLM subset of the eval tasks."""
    figures = {}
    for dataset in datasets:
        rows = summary_rows(layout, dataset, system)
        if rows.is_empty():
            raise ValueError(f"{layout.asset_dir('evaluation', dataset) / 'summary.parquet'} has no figures for "
                             f"system {system!r}: add it to the evaluation's systems")
        figures[dataset] = {row["group"]: {metric: float(row[metric])} for row in rows.iter_rows(named=True)}
    return figures


def system_per_task(layout: ArtifactLayout, datasets: Sequence[str], system: str, metric: str) -> dict[str, float]:
    """``{"<dataset>/<group>/<task_id>": value}`` of ``system`` on the LLM subset of the eval tasks
    (from ``rankings.parquet``; empty when a dataset has no saved rankings)."""
    scores: dict[str, float] = {}
    for dataset in datasets:
        path = layout.asset_dir("evaluation", dataset) / "rankings.parquet"
        if not path.exists():
            return {}
        rows = pl.read_parquet(path).filter((pl.col("system") == system) & pl.col("in_llm_subset"))
        scores |= {f"{dataset}/{row['group']}/{row['task_id']}": float(row[metric])
                   for row in rows.iter_rows(named=True)}
    return scores


def artifact_reference(folder: Path) -> dict:
    """``{"path", "md5"}`` of a referenced folder (md5 empty when DVC does not track it)."""
    return {"path": str(folder), "md5": tracked_md5(folder) or ""}


def serving_budgets(settings: RegistrySettings) -> dict:
    """The served agent's budgets and request bounds, as ``serving.agent.ServingConfig`` names them."""
    return {"max_turns": settings.llm_max_turns, "max_tool_calls": settings.max_tool_calls,
            "max_new_tokens": settings.llm_max_new_tokens, "prompt_history_len": settings.prompt_history_len,
            "max_candidates": settings.max_candidates, "max_history_len": settings.max_history_len}


def policy_adapters(layout: ArtifactLayout, asset: str, lineage: dict) -> list[Path]:
    """The adapter folders a lineage records, in merge order.

    Recorded paths are relative to the project root; a path that is not there is read as
    relative to the policy's own folder (the SFT lineage records ``adapter``)."""
    adapters = []
    for recorded in lineage["adapters"]:
        path = layout.resolve(recorded)
        inside = layout.asset_dir(asset) / recorded
        adapters.append(path if path.exists() or not inside.exists() else inside)
    return adapters


def flat_metrics(figures: dict, metric: str) -> dict[str, float]:
    """``{"<dataset>/<group>/<metric>": value}``: the figures as MLflow metrics."""
    return {f"{d}/{g}/{metric}": v[metric] for d, groups in figures.items() for g, v in groups.items()}


def evaluated_start(layout: ArtifactLayout, datasets: Sequence[str], candidate_system: str) -> str | None:
    """The system the candidate was trained from, when the evaluation scored it in every dataset."""
    start = START_SYSTEM.get(candidate_system)
    if start is None or any(summary_rows(layout, dataset, start).is_empty() for dataset in datasets):
        return None
    return start


def plan_registration(settings: RegistrySettings, layout: ArtifactLayout, datasets: Sequence[str]) -> RegistrationPlan:
    """Read the evaluation's figures and the candidate's lineage; an unknown candidate is an error."""
    if settings.candidate_system not in POLICY_ASSET:
        raise ValueError(f"candidate_system must be one of {sorted(POLICY_ASSET)}, got {settings.candidate_system!r}")
    candidate = system_figures(layout, datasets, settings.candidate_system, settings.metric)
    base = system_figures(layout, datasets, settings.baseline_system, settings.metric)
    policy_asset = POLICY_ASSET[settings.candidate_system]
    lineage = read_lineage(layout, policy_asset)
    start_system = evaluated_start(layout, datasets, settings.candidate_system)
    example = read_table(layout, "task_splits", datasets[0], "tasks_eval.parquet").row(0, named=True)
    return RegistrationPlan(
        candidate=candidate,
        base=base,
        lineage=lineage,
        policy_md5=tracked_md5(layout.asset_dir(policy_asset)),
        base_model=artifact_reference(layout.resolve(lineage["base_model"])),
        adapters=policy_adapters(layout, policy_asset, lineage),
        tool_indexes={d: {name: artifact_reference(folder) for name, folder in index_folders(layout, d).items()}
                      for d in datasets},
        serving=serving_budgets(settings),
        input_example=[{"dataset": datasets[0], "user_id": str(example["user_id"]),
                        "candidate_item_ids": [str(i) for i in example["candidate_item_ids"][:5]]}],
        metrics=flat_metrics(candidate, settings.metric),
        candidate_per_task=system_per_task(layout, datasets, settings.candidate_system, settings.metric),
        start_system=start_system,
        start=system_figures(layout, datasets, start_system, settings.metric) if start_system else None,
        start_per_task=system_per_task(layout, datasets, start_system, settings.metric) if start_system else None,
    )


def write_registration(settings: RegistrySettings, layout: ArtifactLayout, plan: RegistrationPlan,
                       version: str, run_id: str) -> StageArtifact:
    """Write ``assets/registered_model/registration.json`` for the registered ``version``."""
    registration = {
        "model_name": settings.model_name, "version": version, "run_id": run_id,
        "candidate_system": settings.candidate_system, "baseline_system": settings.baseline_system,
        "metric": settings.metric, "margin": settings.margin, "significance_level": settings.significance_level,
        "candidate": plan.candidate, "base": plan.base, "policy_md5": plan.policy_md5,
        "adapters": plan.lineage["adapters"], "candidate_per_task": plan.candidate_per_task,
        "start_system": plan.start_system, "start": plan.start, "start_per_task": plan.start_per_task,
    }
    text = json.dumps(registration, indent=2)
    folder = layout.asset_dir(ASSET)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        (staging / REGISTRATION).write_text(text)
    return StageArtifact(
        folder=folder,
        params={"model_name": settings.model_name, "version": version, "candidate_system": settings.candidate_system},
        metrics=dict(plan.metrics),
        metadata={
            "model_uri": f"models:/{settings.model_name}/{version}",
            "version": version,
            "candidate": Json(plan.candidate),
            "base_model_with_tools": Json(plan.base),
        },
        texts={REGISTRATION: text},
    )


def read_registration(layout: ArtifactLayout) -> dict:
    """The record of the last registered version (what the promotion gate decides on)."""
    path = layout.asset_dir(ASSET) / REGISTRATION
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {ASSET} first")
    return json.loads(path.read_text())
