"""Automation: weekly retraining, retraining when the raw data changes, failed-run alerts.

- ``weekly_retraining`` (schedule): the whole pipeline (every asset, from ingest to the
  registered model and its promotion gate) every Monday 03:00 UTC.
- ``raw_data_changed`` (sensor): the whole pipeline when the md5 in ``data.dvc`` (the DVC
  pointer of the raw ``data/`` folder) changes, i.e. after ``dvc add data``.
- ``pipeline_failure_alert`` (run failure sensor): logs every failed pipeline run to the
  MLflow experiment ``pipeline_failures`` (job, run id, failing steps, error).

The schedule and the data sensor start STOPPED: switch them on in the Dagster UI
(Automation page) or with ``dagster schedule start`` / ``dagster sensor start``. Both run
the job of the profile in ``RECTHINKER_SCHEDULE_PROFILE`` (default ``demo``). The failure
alert starts RUNNING: it only records, it never launches anything.
"""

# No ``from __future__ import annotations`` here: Dagster reads the resource parameters'
# annotations at definition time and needs real classes, not strings.

import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from recthinker_dagster.artifacts import DvcPointerError, dvc_pointer, read_dvc_md5
from recthinker_dagster.defs.resources import MLflowTracking, ProjectPaths
from recthinker_dagster.settings import DEFAULT_PROFILE, PROFILE_NAMES

SCHEDULE_PROFILE_ENV = "RECTHINKER_SCHEDULE_PROFILE"
WEEKLY_CRON = "0 3 * * 1"  # Monday 03:00
SCHEDULE_TIMEZONE = "UTC"
DATA_SENSOR_INTERVAL_SECONDS = 60
FAILURE_EXPERIMENT = "pipeline_failures"
_TAG_LIMIT = 500  # characters of an error message kept in an MLflow tag (full text is an artifact)


def schedule_profile() -> str:
    """The profile that scheduled and sensor-triggered runs use."""
    name = os.environ.get(SCHEDULE_PROFILE_ENV, "").strip() or DEFAULT_PROFILE
    if name not in PROFILE_NAMES:
        raise ValueError(f"{SCHEDULE_PROFILE_ENV}={name!r} is not a profile; choose one of {sorted(PROFILE_NAMES)}")
    return name


def raw_data_pointer(paths: ProjectPaths) -> Path:
    """``data.dvc`` next to the raw data folder (``<root>/data.dvc`` by default)."""
    return dvc_pointer(paths.data_path)


def _job_for(jobs: list, profile: str):
    wanted = f"pipeline_{profile}"
    for job in jobs:
        if job.name == wanted:
            return job
    raise ValueError(f"no job named {wanted!r} among {[job.name for job in jobs]}")


def _failure_details(context: dg.RunFailureSensorContext) -> list[dict[str, str]]:
    """One entry per failed step: its key, the innermost error message and the full error."""
    details = []
    for event in context.get_step_failure_events():
        error = getattr(event.event_specific_data, "error", None)
        root = error
        while root is not None and root.cause is not None:
            root = root.cause
        details.append(
            {
                "step": event.step_key or "",
                # The innermost cause is the user's exception; its message reads "Cls: text".
                "message": ((root.message if root else event.message) or "").strip(),
                "full": error.to_string() if error else (event.message or ""),
            }
        )
    return details


def build_automation(jobs: list) -> dict:
    """The schedules and sensors for the pipeline jobs (``pipeline_<profile>``)."""
    profile = schedule_profile()
    job = _job_for(jobs, profile)
    tags = {"profile": profile}

    @dg.schedule(
        name="weekly_retraining",
        cron_schedule=WEEKLY_CRON,
        execution_timezone=SCHEDULE_TIMEZONE,
        job=job,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=(
            f"Retrain weekly (Monday 03:00 UTC): the whole pipeline, ingest to model promotion, with "
            f"the '{profile}' profile (set {SCHEDULE_PROFILE_ENV}). Starts stopped: switch it on in the UI."
        ),
    )
    def weekly_retraining(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time or datetime.now(UTC)
        stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
        return dg.RunRequest(
            run_key=f"weekly-{stamp}",
            tags={**tags, "trigger": "schedule", "scheduled_for": stamp},
        )

    @dg.sensor(
        name="raw_data_changed",
        job=job,
        minimum_interval_seconds=DATA_SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Rerun the whole pipeline ('{profile}' profile) when the md5 in data.dvc changes "
            "(after `dvc add data`). The first tick only records the current md5."
        ),
    )
    def raw_data_changed(context: dg.SensorEvaluationContext, paths: ProjectPaths):
        pointer = raw_data_pointer(paths)
        try:
            md5 = read_dvc_md5(pointer)
        except DvcPointerError as error:
            return dg.SkipReason(str(error))
        if context.cursor is None:
            context.update_cursor(md5)
            return dg.SkipReason(f"baseline recorded: {pointer.name} md5 {md5}; a later change triggers a run")
        if context.cursor == md5:
            return dg.SkipReason(f"{pointer.name} unchanged (md5 {md5})")
        previous = context.cursor
        context.update_cursor(md5)
        context.log.info(f"{pointer.name} changed: {previous} -> {md5}")
        return dg.RunRequest(
            run_key=f"data-{md5}",
            tags={**tags, "trigger": "raw_data_changed", "data_md5": md5, "previous_data_md5": previous},
        )

    @dg.run_failure_sensor(
        name="pipeline_failure_alert",
        monitored_jobs=list(jobs),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Logs each failed pipeline run to the MLflow experiment '{FAILURE_EXPERIMENT}'.",
    )
    def pipeline_failure_alert(context: dg.RunFailureSensorContext, mlflow: MLflowTracking):
        record_failure(context, mlflow)

    return {"schedules": [weekly_retraining], "sensors": [raw_data_changed, pipeline_failure_alert]}


def record_failure(context: dg.RunFailureSensorContext, mlflow: MLflowTracking) -> str | None:
    """Log a failed run to MLflow (experiment ``pipeline_failures``); return the MLflow run id."""
    run = context.dagster_run
    steps = _failure_details(context)
    if steps:
        summary = "; ".join(f"{s['step']}: {s['message']}" for s in steps)
        full = "\n\n".join(f"## {s['step']}\n{s['full']}" for s in steps)
    else:  # the run failed outside any step (launch, config, resources)
        summary = (context.failure_event.message or "run failed").strip()
        full = summary
    context.log.error(f"pipeline run {run.run_id} of {run.job_name} failed: {summary}")
    tracker = MLflowTracking(
        tracking_uri=mlflow.tracking_uri,
        artifact_root=mlflow.artifact_root,
        experiment_name=FAILURE_EXPERIMENT,
        enabled=mlflow.enabled,
    )
    try:
        return tracker.log_run(
            f"{run.job_name} failed",
            metrics={"failed_steps": len(steps)},
            tags={
                "dagster_job": run.job_name,
                "dagster_run_id": run.run_id,
                "failed_steps": ",".join(s["step"] for s in steps),
                "error": summary[:_TAG_LIMIT],
                "profile": run.tags.get("profile", ""),
                "trigger": run.tags.get("trigger", "manual"),
            },
            texts={"error.txt": full},
        )
    except Exception as error:  # the alert must never hide the failure it reports
        context.log.warning(f"could not log the failure to MLflow: {error}")
        return None
