"""The Dagster code location: ``dagster dev`` (with workspace.yaml) loads ``defs`` from here."""

from __future__ import annotations

import os

import dagster as dg

from recthinker_dagster.defs.automation import build_automation
from recthinker_dagster.defs.datasets import build_dataset_assets
from recthinker_dagster.defs.evaluation import build_evaluation_assets
from recthinker_dagster.defs.jobs import data_jobs, headline_jobs, pipeline_jobs, think_jobs
from recthinker_dagster.defs.model import base_model
from recthinker_dagster.defs.registry import build_registry_assets
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.rl import build_rl_assets
from recthinker_dagster.defs.think import build_think_assets
from recthinker_dagster.defs.tools import build_tool_assets
from recthinker_dagster.defs.training import build_training_assets
from recthinker_dagster.defs.trajectories import build_trajectory_assets

DEFAULT_DATASETS = ("ml-1m", "amazon-cds")


EXECUTORS = ("in_process", "multiprocess", "celery")


def configured_datasets() -> list[str]:
    raw = os.environ.get("RECTHINKER_DATASETS", ",".join(DEFAULT_DATASETS))
    return [name.strip() for name in raw.split(",") if name.strip()]


def configured_executor() -> dg.ExecutorDefinition:
    """``$RECTHINKER_EXECUTOR``: ``in_process`` (default: one process, steps share the imports
    and the cores), ``multiprocess`` (independent steps, such as the per-dataset branches, in
    parallel, at most ``$RECTHINKER_MAX_CONCURRENT`` at once, default the core count; the heavy
    stages share one concurrency pool, ``keys.HEAVY_POOL``) or ``celery`` (every step a task
    for the ``dagster-celery`` workers on ``$RECTHINKER_CELERY_BROKER``, default a local
    Redis). See docs/deploy.md."""
    name = os.environ.get("RECTHINKER_EXECUTOR", "in_process")
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        limit = int(os.environ.get("RECTHINKER_MAX_CONCURRENT") or os.cpu_count() or 1)
        return dg.multiprocess_executor.configured({"max_concurrent": limit})
    if name == "celery":
        from dagster_celery import celery_executor

        broker = os.environ.get("RECTHINKER_CELERY_BROKER", "redis://localhost:6379/0")
        return celery_executor.configured({"broker": broker,
                                           "backend": os.environ.get("RECTHINKER_CELERY_BACKEND", broker)})
    raise ValueError(f"RECTHINKER_EXECUTOR must be one of {list(EXECUTORS)}, got {name!r}")


def build_definitions(datasets: list[str] | None = None, resources: dict | None = None) -> dg.Definitions:
    datasets = list(datasets or configured_datasets())
    assets_and_checks = [base_model]
    for dataset in datasets:
        assets_and_checks.extend(build_dataset_assets(dataset))
        assets_and_checks.extend(build_tool_assets(dataset))
        assets_and_checks.extend(build_trajectory_assets(dataset))
        assets_and_checks.extend(build_evaluation_assets(dataset))
    assets_and_checks.extend(build_training_assets(datasets))
    assets_and_checks.extend(build_rl_assets(datasets))
    assets_and_checks.extend(build_registry_assets(datasets))
    assets_and_checks.extend(build_think_assets(datasets))
    assets = [a for a in assets_and_checks if not isinstance(a, dg.AssetChecksDefinition)]
    checks = [a for a in assets_and_checks if isinstance(a, dg.AssetChecksDefinition)]
    jobs = pipeline_jobs(datasets)
    side_jobs = think_jobs(datasets) + headline_jobs(datasets) + data_jobs(datasets)  # parts of the pipeline
    automation = build_automation(jobs)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[*jobs, *side_jobs],
        schedules=automation["schedules"],
        sensors=automation["sensors"],
        resources=resources or {"paths": ProjectPaths(), "dvc": DVCVersioning(), "mlflow": MLflowTracking()},
        executor=configured_executor(),
    )


defs = build_definitions()
