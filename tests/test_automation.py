"""Schedule, raw-data sensor and failure alert, evaluated with Dagster's testing utilities."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from recthinker_dagster.definitions import build_definitions
from recthinker_dagster.defs.automation import FAILURE_EXPERIMENT, SCHEDULE_PROFILE_ENV


def _defs(project, monkeypatch, profile: str | None = None) -> dg.Definitions:
    if profile is None:
        monkeypatch.delenv(SCHEDULE_PROFILE_ENV, raising=False)
    else:
        monkeypatch.setenv(SCHEDULE_PROFILE_ENV, profile)
    return build_definitions(datasets=["synthetic"], resources=project.resources)


def _tick(defs: dg.Definitions, project, cursor: str | None):
    sensor = defs.resolve_sensor_def("raw_data_changed")
    context = dg.build_sensor_context(cursor=cursor, resources={"paths": project.paths})
    return sensor.evaluate_tick(context)


def test_automation_is_registered_and_off_until_switched_on(project, monkeypatch):
    defs = _defs(project, monkeypatch)
    schedule = defs.resolve_schedule_def("weekly_retraining")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.execution_timezone == "UTC"
    assert defs.resolve_sensor_def("raw_data_changed").default_status == dg.DefaultSensorStatus.STOPPED
    # The alert only records, so it is on from the start.
    assert defs.resolve_sensor_def("pipeline_failure_alert").default_status == dg.DefaultSensorStatus.RUNNING


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_weekly_schedule_requests_a_valid_run_of_the_profile_job(project, monkeypatch, profile):
    defs = _defs(project, monkeypatch, profile)
    expected = profile or "demo"
    schedule = defs.resolve_schedule_def("weekly_retraining")
    assert schedule.job_name == f"pipeline_{expected}"
    when = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)  # a Monday
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when))
    assert len(data.run_requests) == 1
    request = data.run_requests[0]
    assert request.run_key == "weekly-2026-03-02T03:00Z"
    assert request.tags["profile"] == expected
    assert request.tags["trigger"] == "schedule"

    job = defs.resolve_job_def(schedule.job_name)
    validated = dg.validate_run_config(job, request.run_config)
    ops = validated["ops"]
    assert ops["synthetic__task_splits"]["config"]["profile"] == expected
    assert ops["base_model"]["config"]["profile"] == expected
    # Every asset of the agent's graph is retrained (the think branch has its own jobs).
    think = set(defs.resolve_job_def(f"think_{expected}").asset_layer.selected_asset_keys)
    assert think and job.asset_layer.selected_asset_keys == set(defs.resolve_asset_graph().get_all_asset_keys()) - think


def test_unknown_schedule_profile_fails_at_load_with_a_clear_message(project, monkeypatch):
    with pytest.raises(ValueError, match="RECTHINKER_SCHEDULE_PROFILE='huge'"):
        _defs(project, monkeypatch, "huge")


def test_raw_data_sensor_records_a_baseline_then_runs_once_per_change(project, monkeypatch):
    defs = _defs(project, monkeypatch)
    dvc = project.resources["dvc"]
    data = project.root / "data"
    (data / "toy").mkdir(parents=True)
    (data / "toy" / "ratings.csv").write_text("user,item\n1,2\n")
    first = dvc.track(data)["md5"]
    assert (project.root / "data.dvc").is_file()

    baseline = _tick(defs, project, cursor=None)
    assert not baseline.run_requests
    assert baseline.cursor == first
    assert "baseline recorded" in baseline.skip_message

    unchanged = _tick(defs, project, cursor=baseline.cursor)
    assert not unchanged.run_requests
    assert "unchanged" in unchanged.skip_message
    assert unchanged.cursor in (None, first)  # not moved

    (data / "toy" / "ratings.csv").write_text("user,item\n1,2\n3,4\n")
    second = dvc.track(data)["md5"]
    assert second != first
    changed = _tick(defs, project, cursor=first)
    assert len(changed.run_requests) == 1
    request = changed.run_requests[0]
    assert changed.cursor == second
    assert request.run_key == f"data-{second}"
    assert request.tags["data_md5"] == second
    assert request.tags["previous_data_md5"] == first
    assert request.tags["trigger"] == "raw_data_changed"
    assert request.tags["profile"] == "demo"
    assert defs.resolve_sensor_def("raw_data_changed").job_name == "pipeline_demo"

    again = _tick(defs, project, cursor=changed.cursor)
    assert not again.run_requests


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "is missing"),
        ("outs: [unclosed\n", "not valid YAML"),
        ("just a string\n", "no 'outs' list"),
        ("outs: []\n", "no 'outs' list"),
        ("outs:\n- path: data\n  size: 3\n", "has no md5"),
    ],
)
def test_raw_data_sensor_skips_on_a_missing_or_malformed_pointer(project, monkeypatch, content, problem):
    defs = _defs(project, monkeypatch)
    pointer: Path = project.root / "data.dvc"
    if content is not None:
        pointer.write_text(content)
    result = _tick(defs, project, cursor="abc.dir")
    assert not result.run_requests
    assert "data.dvc" in result.skip_message
    assert problem in result.skip_message
    assert result.cursor in (None, "abc.dir")  # the last good md5 is kept


def test_failure_sensor_logs_a_failed_run_to_mlflow(project, monkeypatch):
    import mlflow

    defs = _defs(project, monkeypatch)

    @dg.op
    def load_ratings():
        raise RuntimeError("ratings.dat is truncated")

    @dg.job
    def tiny_failing_job():
        load_ratings()

    instance = dg.DagsterInstance.ephemeral()
    result = tiny_failing_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success

    context = dg.build_run_status_sensor_context(
        sensor_name="pipeline_failure_alert",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"mlflow": project.resources["mlflow"]},
    )
    defs.resolve_sensor_def("pipeline_failure_alert")(context)

    client = mlflow.MlflowClient(project.tracking_uri)
    experiment = client.get_experiment_by_name(FAILURE_EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["dagster_job"] == "tiny_failing_job"
    assert tags["dagster_run_id"] == result.run_id
    assert tags["failed_steps"] == "load_ratings"
    assert tags["error"] == "load_ratings: RuntimeError: ratings.dat is truncated"
    assert runs[0].data.metrics["failed_steps"] == 1
    text = Path(mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="error.txt",
                                                    tracking_uri=project.tracking_uri)).read_text()
    assert "ratings.dat is truncated" in text
