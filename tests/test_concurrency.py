"""Two runs materialize the same assets at the same moment, in two processes, on one project.

Each process runs the synthetic dataset's ingestion and protocol splits with ``dg.materialize``
(its own ephemeral Dagster instance, as two ``dagster`` CLI runs or a CLI run next to the UI
would); a barrier releases both together. The two runs use different protocol seeds, so their
``task_splits`` versions differ and a mix-up is visible. Afterwards:

- both runs succeeded, and one waited for the other's publication lock at least once;
- the published folder is one complete version: exactly the version one of the runs logged,
  ``dvc status`` (workspace and remote) reports nothing, and no staging folder is left behind;
- the DVC cache holds both versions whole (every file's object hashes to its name), and each
  version's ``protocol.json`` carries the seed of the run that logged it;
- every MLflow run of both runs is FINISHED and tags the DVC version its own run produced.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlflow
import pytest

from recthinker_dagster.artifacts import TABLES, tracked_md5

DATASET = "synthetic"
SEEDS = (101, 202)
BARRIER_TIMEOUT_S = 300  # both processes import Dagster, DVC and polars before the barrier
WAITING = "waiting for another run that is publishing the same artifact"  # defs/publishing.publication_lock


def _materialize_when_released(root: Path, seed: int, barrier) -> dict:
    """One run (in a spawned process): wait for the other, then ingest + split; a summary back."""
    import dagster as dg

    from recthinker_dagster.defs.datasets import build_dataset_assets
    from tests.support.project import open_project, run_config

    resources = open_project(root).resources
    assets = build_dataset_assets(DATASET)
    config = run_config(DATASET, seed=seed)
    instance = dg.DagsterInstance.ephemeral()
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    started = time.time()
    result = dg.materialize(assets, resources=resources, run_config=config, instance=instance, raise_on_error=False)
    finished = time.time()
    waited = [entry.user_message for entry in instance.all_logs(result.run_id) if WAITING in entry.user_message]
    materialized = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        metadata = materialization.metadata
        materialized[materialization.asset_key.path[-1]] = {
            "dvc_md5": metadata["dvc_md5"].value if "dvc_md5" in metadata else "",
            "mlflow_run_id": metadata["mlflow_run_id"].value,
        }
    failures = [str(e.message) for e in result.all_events if e.is_failure]
    return {"seed": seed, "run_id": result.run_id, "success": result.success, "failures": failures,
            "started": started, "finished": finished, "materialized": materialized, "waited": waited}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, make_project):
    project = make_project(tmp_path_factory.mktemp("concurrent") / "project")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no shared DVC/MLflow state
    with context.Manager() as manager, ProcessPoolExecutor(len(SEEDS), mp_context=context) as pool:
        barrier = manager.Barrier(len(SEEDS))
        futures = [pool.submit(_materialize_when_released, project.root, seed, barrier) for seed in SEEDS]
        runs = [future.result(timeout=900) for future in futures]
    return project, runs


def _cache_object(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - DVC's content hash, not security


def _manifest(root: Path, md5: str) -> dict[str, str]:
    """``{relpath: md5}`` of a folder version in the DVC cache, each object checked against its name."""
    entries = json.loads(_cache_object(root, md5).read_text())
    files = {entry["relpath"]: entry["md5"] for entry in entries}
    for relpath, file_md5 in files.items():
        obj = _cache_object(root, file_md5)
        assert obj.is_file(), f"{md5}: {relpath} is not in the DVC cache"
        assert _file_md5(obj) == file_md5, f"{md5}: the cached {relpath} is corrupt"
    return files


def test_both_runs_ran_at_once_and_succeeded(two_runs):
    _, runs = two_runs
    for run in runs:
        assert run["success"], run["failures"]
    first, second = runs
    assert first["started"] < second["finished"] and second["started"] < first["finished"], "the runs did not overlap"
    assert first["waited"] or second["waited"], "neither run waited for the other's publication lock"
    names = {"raw_dataset", *TABLES, "task_splits"}
    assert all(set(run["materialized"]) == names for run in runs), [sorted(r["materialized"]) for r in runs]


def test_the_published_folder_is_one_whole_version_that_dvc_agrees_with(two_runs):
    from dvc.repo import Repo

    project, runs = two_runs
    root = project.root
    for asset in (*TABLES, "task_splits"):
        folder = project.paths.asset_dir(asset, DATASET)
        logged = {run["materialized"][asset]["dvc_md5"] for run in runs}
        published = tracked_md5(folder)
        assert published in logged, f"{asset}: the pointer records {published}, no run logged it ({logged})"
        files = _manifest(root, published)
        on_disk = {str(p.relative_to(folder)): _file_md5(p) for p in folder.rglob("*") if p.is_file()}
        assert on_disk == files, f"{asset}: the published folder is not the version its pointer records"
        leftovers = [p.name for p in folder.parent.iterdir() if p.name not in {folder.name, f"{folder.name}.dvc"}]
        assert not leftovers, f"{asset}: left behind next to the published folder: {leftovers}"
    with Repo(str(root)) as repo:
        assert repo.status() == {}, "dvc status: the workspace differs from the pointers"
        assert repo.status(cloud=True) == {}, "dvc status -c: the remote lacks a published version"


def test_each_run_versioned_its_own_splits_whole(two_runs):
    project, runs = two_runs
    md5s = [run["materialized"]["task_splits"]["dvc_md5"] for run in runs]
    assert md5s[0] != md5s[1], "two seeds, one version: a run logged the other's folder"
    for run, md5 in zip(runs, md5s, strict=True):
        files = _manifest(project.root, md5)
        protocol = json.loads(_cache_object(project.root, files["protocol.json"]).read_text())
        assert protocol["seed"] == run["seed"], f"version {md5} logged by the seed-{run['seed']} run holds another seed"


def test_every_mlflow_run_finished_and_tags_its_own_version(two_runs):
    project, runs = two_runs
    client = mlflow.MlflowClient(project.tracking_uri)
    for run in runs:
        for asset, logged in run["materialized"].items():
            mlflow_run = client.get_run(logged["mlflow_run_id"])
            assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.end_time, (asset, mlflow_run.info)
            assert mlflow_run.data.tags["dagster_run_id"] == run["run_id"]
            if asset != "raw_dataset":  # the synthetic source has no files to version
                assert mlflow_run.data.tags["dvc_md5"] == logged["dvc_md5"]
                assert mlflow_run.data.metrics["artifact_bytes"] > 0
    splits_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     filter_string=f"tags.asset = '{DATASET}/task_splits'")
    assert len(splits_runs) == len(runs)
