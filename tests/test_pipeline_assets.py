"""Real Dagster runs of the ingestion and protocol assets: DVC versions, MLflow runs,
blocking checks, and bad input that fails cleanly and keeps the last good artifacts."""

from __future__ import annotations

import dagster as dg
import mlflow
import polars as pl
import pytest

from recthinker_dagster.artifacts import INDEX_ASSETS, read_tasks
from recthinker_dagster.defs.datasets import build_dataset_assets
from recthinker_dagster.defs.tools import build_tool_assets
from recthinker_dagster.stages import ingest as ingest_stage
from tests.support.project import run_config, write_small_movielens


def _materialize(project, dataset, config=None, raise_on_error=True, with_tools=False):
    return dg.materialize(
        build_dataset_assets(dataset) + (build_tool_assets(dataset) if with_tools else []),
        resources=project.resources,
        run_config=config or run_config(dataset, with_tools=with_tools),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


def _parquet_bytes(project, asset, dataset, name=None):
    return (project.paths.asset_dir(asset, dataset) / (name or f"{asset}.parquet")).read_bytes()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, make_project):
    project = make_project(tmp_path_factory.mktemp("synthetic-project"))
    result = _materialize(project, "synthetic", with_tools=True)
    return project, result


def test_synthetic_pipeline_materializes_every_asset_and_passes_checks(synthetic_run):
    project, result = synthetic_run
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    tables = ("raw_dataset", "interactions", "items", "users", "task_splits", "tool_suite", *INDEX_ASSETS.values())
    assert materialized == {f"synthetic/{a}" for a in tables}
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5 and all(c.passed for c in checks), [c.metadata for c in checks]
    assert {c.check_name for c in checks} >= {"protocol_quality", "no_target_leakage"}
    tasks = pl.read_parquet(project.paths.asset_dir("task_splits", "synthetic") / "tasks_eval.parquet")
    assert set(tasks["group"]) == {"sparse", "dense"}


def test_data_version_is_the_dvc_hash_and_the_remote_has_it(synthetic_run):
    project, result = synthetic_run
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        key = materialization.asset_key
        if key.path[-1] == "raw_dataset":
            continue
        folder = project.paths.asset_dir(key.path[-1], "synthetic")
        assert folder.is_dir(), folder
        dvc_md5 = project.resources["dvc"].tracked_md5(folder)
        assert dvc_md5 and dvc_md5.endswith(".dir")
        assert materialization.metadata["dvc_md5"].value == dvc_md5
        assert materialization.tags["dagster/data_version"] == dvc_md5
    remote = project.root / "dvc_remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push put nothing in the remote"


def test_every_materialization_is_an_mlflow_run_with_tags(synthetic_run):
    project, result = synthetic_run
    mlflow.set_tracking_uri(project.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["recthinker"], output_format="list")
    by_asset = {run.data.tags["asset"]: run for run in runs}
    assert set(by_asset) >= {"synthetic/interactions", "synthetic/task_splits"}
    run = by_asset["synthetic/task_splits"]
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["dvc_md5"].endswith(".dir")
    assert run.data.params["n_candidates"] == "10"
    assert run.data.metrics["tasks"] > 0
    assert by_asset["synthetic/interactions"].data.metrics["rows"] > 0
    cf_run = by_asset["synthetic/cf_model"]
    assert cf_run.data.metrics["valid_ndcg_at_10"] > 0
    losses = mlflow.MlflowClient(project.tracking_uri).get_metric_history(cf_run.info.run_id, "train_loss")
    assert len(losses) == 2 and losses[1].value < losses[0].value


def test_failing_blocking_check_stops_downstream_assets(project, monkeypatch):

    def always_fails(frame):
        from recthinker_dagster.quality import validate_interactions

        report = validate_interactions(frame.with_columns(pl.lit(9.0, pl.Float32).alias("rating")))
        assert not report.success
        return report

    monkeypatch.setitem(ingest_stage.TABLE_VALIDATORS, "interactions", always_fails)
    result = _materialize(project, "synthetic", raise_on_error=False)
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [c.check_name for c in failed] == ["interactions_quality"]
    assert "rating" in str(failed[0].metadata["failures"].value)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "synthetic/task_splits" not in materialized


def test_leakage_check_fails_when_an_index_knows_a_target(synthetic_run, tmp_path, make_project):
    import shutil

    from recthinker_dagster.tools import UserProfiles

    project, _ = synthetic_run
    leaky = make_project(tmp_path / "leaky")
    shutil.copytree(project.root / "assets", leaky.root / "assets")
    paths = leaky.paths
    # Rebuild the profiles index from *all* interactions: eval targets become visible.
    interactions = pl.read_parquet(paths.asset_dir("interactions", "synthetic") / "interactions.parquet")
    items = pl.read_parquet(paths.asset_dir("items", "synthetic") / "items.parquet")
    folder = paths.asset_dir("user_profiles", "synthetic")
    shutil.rmtree(folder)
    UserProfiles.build(interactions, items, None).save(folder)
    assert read_tasks(paths.layout, "synthetic").height > 0

    result = dg.materialize(
        build_tool_assets("synthetic"),
        selection=dg.AssetSelection.all_asset_checks(),
        resources=leaky.resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert evaluation.metadata["leaking_tasks"].value > 0


def test_malformed_file_fails_with_location_and_keeps_last_good_version(project):
    folder = project.paths.data_path / "ml-1m"
    write_small_movielens(folder)
    assert _materialize(project, "ml-1m").success
    good = {a: _parquet_bytes(project, a, "ml-1m") for a in ("interactions", "items", "users")}
    good_md5 = project.resources["dvc"].tracked_md5(project.paths.asset_dir("interactions", "ml-1m"))

    lines = (folder / "ratings.dat").read_text().splitlines()
    lines[4] = "1::1193::9::978300760"  # a rating of 9 on line 5
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    result = _materialize(project, "ml-1m", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.to_string() if failure.step_failure_data.error else ""
    assert "ratings.dat" in message and "line 5" in message and "rating" in message
    for asset, content in good.items():
        assert _parquet_bytes(project, asset, "ml-1m") == content
    assert project.resources["dvc"].tracked_md5(project.paths.asset_dir("interactions", "ml-1m")) == good_md5
    leftovers = [p.name for p in project.paths.asset_dir("interactions").iterdir() if p.name.startswith(".")]
    assert not [name for name in leftovers if "staging" in name]


def test_earlier_version_is_restorable_from_dvc(project):
    write_small_movielens(project.paths.data_path / "ml-1m", n_lines=3000)
    assert _materialize(project, "ml-1m").success
    folder = project.paths.asset_dir("interactions", "ml-1m")
    first_md5, first_bytes = project.resources["dvc"].tracked_md5(folder), _parquet_bytes(project, "interactions", "ml-1m")

    write_small_movielens(project.paths.data_path / "ml-1m", n_lines=4000)
    assert _materialize(project, "ml-1m").success
    assert project.resources["dvc"].tracked_md5(folder) != first_md5

    project.resources["dvc"].restore(folder, first_md5)
    assert _parquet_bytes(project, "interactions", "ml-1m") == first_bytes
    assert project.resources["dvc"].tracked_md5(folder) == first_md5


def test_base_model_asset_is_versioned_and_logged(project, prepared_base_model):
    from recthinker_dagster.defs.config import BaseModelConfig
    from recthinker_dagster.defs.model import base_model

    prepared_folder, _ = prepared_base_model
    result = dg.materialize(
        [base_model],
        resources=project.resources,
        run_config=dg.RunConfig(ops={"base_model": BaseModelConfig(profile="smoke", source=str(prepared_folder))}),
        instance=dg.DagsterInstance.ephemeral(),
    )
    materialization = result.asset_materializations_for_node("base_model")[0]
    folder = project.paths.asset_dir("base_model")
    assert (folder / "model.safetensors").exists()
    assert materialization.metadata["dvc_md5"].value == project.resources["dvc"].tracked_md5(folder)
    assert "paris" in materialization.metadata["sanity_output"].value.lower()
    assert materialization.metadata["verification"].value["weights_max_abs_diff"] == 0.0


def test_teacher_trajectories_resume_after_an_interruption(synthetic_run):
    from recthinker_dagster.agent.generation import read_records
    from recthinker_dagster.defs.config import TeacherConfig
    from recthinker_dagster.defs.trajectories import build_trajectory_assets
    from recthinker_dagster.stages.trajectories import work_file_for

    project, _ = synthetic_run
    assets = build_trajectory_assets("synthetic")
    config = TeacherConfig(profile="smoke", samples_per_task=2)
    run_config = dg.RunConfig(ops={"synthetic__teacher_trajectories": config})

    def materialize():
        return dg.materialize(assets, resources=project.resources, run_config=run_config, instance=dg.DagsterInstance.ephemeral())

    first = materialize().asset_materializations_for_node("synthetic__teacher_trajectories")[0]
    published = project.paths.asset_dir("teacher_trajectories", "synthetic") / "trajectories.jsonl"
    records, _ = read_records(published)
    n_tasks = pl.read_parquet(project.paths.asset_dir("task_splits", "synthetic") / "tasks_train.parquet").height
    assert len(records) == first.metadata["trajectories"].value == 2 * n_tasks
    assert first.metadata["resumed"].value == 0 and first.metadata["valid_rate"].value > 0.9
    assert "**tool**" in first.metadata["example_trajectory"].value

    # A killed run leaves half the records and a cut-off line in its work file.
    tasks = pl.read_parquet(project.paths.asset_dir("task_splits", "synthetic") / "tasks_train.parquet")
    work_file = work_file_for(project.paths.layout, "synthetic", config.settings(), tasks["task_id"].to_list())
    lines = published.read_text().splitlines(keepends=True)
    work_file.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:50])
    second = materialize().asset_materializations_for_node("synthetic__teacher_trajectories")[0]
    assert second.metadata["resumed"].value == len(lines) // 2
    resumed, dropped = read_records(published)
    assert dropped == 0 and len(resumed) == len(records)
    assert {(r["task_id"], r["sample_index"]) for r in resumed} == {(r["task_id"], r["sample_index"]) for r in records}
    assert not work_file.exists()


def test_evaluation_scores_every_system_on_the_eval_tasks(synthetic_run):
    from recthinker_dagster.defs.config import EvaluationConfig
    from recthinker_dagster.defs.evaluation import build_evaluation_assets
    from recthinker_dagster.metrics import task_metrics

    project, _ = synthetic_run
    systems = ["random", "popularity", "bprmf", "sasrec", "teacher"]
    config = EvaluationConfig(profile="smoke", systems=systems, n_bootstrap=100)
    result = dg.materialize(
        build_evaluation_assets("synthetic"),
        resources=project.resources,
        run_config=dg.RunConfig(ops={"synthetic__evaluation": config}),
        instance=dg.DagsterInstance.ephemeral(),
    )
    materialization = result.asset_materializations_for_node("synthetic__evaluation")[0]
    folder = project.paths.asset_dir("evaluation", "synthetic")
    rankings = pl.read_parquet(folder / "rankings.parquet")
    eval_tasks = pl.read_parquet(project.paths.asset_dir("task_splits", "synthetic") / "tasks_eval.parquet")
    assert rankings.height == len(systems) * eval_tasks.height
    # The saved rankings reproduce the reported numbers.
    row = rankings.row(0, named=True)
    assert task_metrics(row["ranking"], row["target_item_id"])["ndcg@10"] == row["ndcg@10"]
    table = materialization.metadata["results"].value
    assert all(f"| {system} | sparse |" in table and f"| {system} | dense |" in table for system in systems)
    assert materialization.metadata["agents"].value["teacher"]["tool_calls_per_task"] > 0
    assert (folder / "ndcg10_by_system.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
