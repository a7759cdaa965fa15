"""Write, audit, publish: a staged output that fails its gate never replaces the good version.

The storage layer on its own (audits, rejected folders and their cap, the per-artifact lock)
and the real Dagster ingestion and protocol assets: an empty ratings file, a header-only item
file and a failing splits audit each fail the run, with the published folders, their ``.dvc``
pointers, ``data.dvc``, the DVC cache and the remote byte-identical before and after; two
runs publishing the same tables at once queue on the lock and leave a consistent version.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import pytest

from recthinker_dagster.artifacts import INDEX_ASSETS, TABLES, ArtifactLayout
from recthinker_dagster.defs import datasets as dataset_defs
from recthinker_dagster.defs import keys, publishing
from recthinker_dagster.defs.config import IngestConfig, TaskSplitConfig
from recthinker_dagster.defs.datasets import build_dataset_assets
from recthinker_dagster.defs.resources import DVCVersioning
from recthinker_dagster.quality import QualityResult
from recthinker_dagster.settings import IngestSettings, ToolIndexSettings, load_profile
from recthinker_dagster.stages import indexes as index_stage
from recthinker_dagster.stages import ingest as ingest_stage
from recthinker_dagster.stages import splits as splits_stage
from recthinker_dagster.stages.indexes import build_tool_indexes_stage
from recthinker_dagster.stages.ingest import build_ingest_stage
from recthinker_dagster.stages.splits import build_task_splits_stage
from recthinker_dagster.storage import (
    FAILURES_FILE,
    MAX_REJECTED,
    AuditFailed,
    artifact_locks,
    rejected_folders,
    remove_stale_staging,
    staged_directories,
    staged_directory,
)
from tests.support.paths import require_shared
from tests.support.project import run_config, write_small_movielens

# -- storage: audit before the swap ----------------------------------------------------------------


def published(tmp_path: Path, content: str = "good") -> Path:
    folder = tmp_path / "assets" / "table" / "ds"
    folder.mkdir(parents=True)
    (folder / "table.parquet").write_text(content)
    return folder


def test_a_failed_audit_keeps_the_published_folder_and_the_staged_output(tmp_path):
    folder = published(tmp_path)
    seen = []

    def audit(staged: Path) -> list[str]:
        seen.append((staged.name, (staged / "table.parquet").read_text()))
        return ["expect_table_row_count_to_be_between(>=1): observed 0"]

    with pytest.raises(AuditFailed) as failed:
        with staged_directory(folder, audit=audit, lock_dir=tmp_path / "locks") as staging:
            (staging / "table.parquet").write_text("empty")
    assert seen and ".staging-" in seen[0][0] and seen[0][1] == "empty"  # the audit saw the staged output
    assert (folder / "table.parquet").read_text() == "good"
    [kept] = rejected_folders(folder)
    assert kept.name.startswith(".ds.rejected-") and (kept / "table.parquet").read_text() == "empty"
    assert "expect_table_row_count_to_be_between(>=1): observed 0" in (kept / FAILURES_FILE).read_text()
    assert failed.value.failures == ["expect_table_row_count_to_be_between(>=1): observed 0"]
    assert str(folder) in str(failed.value) and kept.name in str(failed.value)
    assert not [p for p in folder.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name]


def test_a_passing_audit_swaps_the_staged_output_in(tmp_path):
    folder = published(tmp_path)
    with staged_directory(folder, audit=lambda staged: [], lock_dir=tmp_path / "locks") as staging:
        (staging / "table.parquet").write_text("new")
    assert (folder / "table.parquet").read_text() == "new" and rejected_folders(folder) == []


def test_an_audit_that_cannot_read_the_output_rejects_it(tmp_path):
    folder = published(tmp_path)

    def audit(staged: Path) -> list[str]:
        return [(staged / "missing.parquet").read_text()]

    with pytest.raises(AuditFailed, match="the audit could not run: FileNotFoundError"):
        with staged_directory(folder, audit=audit):
            pass
    assert (folder / "table.parquet").read_text() == "good" and len(rejected_folders(folder)) == 1


def test_folders_staged_together_are_all_audited_before_any_swap(tmp_path):
    folders = {name: published(tmp_path / name, "good") for name in TABLES}

    def audit(staged):
        assert set(staged) == set(TABLES) and all(p.is_dir() for p in staged.values())
        return {"interactions": [], "items": ["expect_table_row_count_to_be_between(>=1): observed 0"], "users": []}

    with pytest.raises(AuditFailed) as failed:
        with staged_directories(folders, audit=audit) as staging:
            for folder in staging.values():
                (folder / "table.parquet").write_text("new")
    assert all((folder / "table.parquet").read_text() == "good" for folder in folders.values())
    assert set(failed.value.rejections) == set(TABLES)  # the passing ones are kept with the failing one
    assert failed.value.rejections["items"].failures and not failed.value.rejections["users"].failures
    assert "passed; rejected with" in (failed.value.rejections["users"].kept_at / FAILURES_FILE).read_text()


def test_rejected_outputs_are_capped_and_left_alone_by_the_stale_staging_cleanup(tmp_path):
    folder = published(tmp_path)
    for _ in range(MAX_REJECTED + 2):
        with pytest.raises(AuditFailed):
            with staged_directory(folder, audit=lambda staged: ["failed"]):
                pass
        time.sleep(0.01)
    kept = rejected_folders(folder)
    assert len(kept) == MAX_REJECTED
    (folder.parent / ".ds.staging-1234").mkdir()  # an old-style leftover: stale
    (folder.parent / f".ds.staging-{os.getpid()}-abcd1234").mkdir()  # a live build of this process
    removed = remove_stale_staging(folder.parent)
    assert [p.name for p in removed] == [".ds.staging-1234"]
    assert rejected_folders(folder) == kept


def test_concurrent_publications_of_one_folder_queue_on_its_lock(tmp_path):
    folder, locks = published(tmp_path), tmp_path / "locks"
    inside, overlaps = [], []

    def publish(writer: str) -> None:
        with artifact_locks([folder], locks):  # what the Dagster asset holds from stage to DVC push
            inside.append(writer)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            with staged_directory(folder, audit=lambda staged: [], lock_dir=locks) as staging:  # re-entrant
                for part in range(20):
                    (staging / f"part-{part}").write_text(writer)
                    time.sleep(0.005)
            assert {p.read_text() for p in folder.glob("part-*")} == {writer}  # nobody swapped in between
            inside.remove(writer)

    threads = [threading.Thread(target=publish, args=(f"writer-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert len({p.read_text() for p in folder.glob("part-*")}) == 1 and len(list(folder.glob("part-*"))) == 20
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ds"]


# -- the stages: all staged folders audited before any swap ---------------------------------------


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def synthetic_layout(tmp_path_factory) -> ArtifactLayout:
    """The synthetic dataset ingested, split (smoke protocol) and indexed, without Dagster."""
    layout = ArtifactLayout(tmp_path_factory.mktemp("stages"))
    build_ingest_stage(IngestSettings(allow_download=False), layout, "synthetic", log=quiet)
    build_task_splits_stage(load_profile("smoke").protocol, layout, "synthetic", log=quiet)
    build_tool_indexes_stage(ToolIndexSettings(bpr_epochs=1, sasrec_train_windows=500), layout, "synthetic", log=quiet)
    return layout


def folder_digests(layout: ArtifactLayout, assets) -> dict[str, dict[str, str]]:
    return {asset: file_digests(layout.asset_dir(asset, "synthetic")) for asset in assets}


def test_one_failing_table_keeps_all_three_published_tables(synthetic_layout, monkeypatch):
    before = folder_digests(synthetic_layout, TABLES)
    failure = "expect_table_row_count_to_be_between(>=1): observed 0"
    monkeypatch.setitem(ingest_stage.TABLE_VALIDATORS, "items", lambda frame: QualityResult("items", False, [failure], 6))
    with pytest.raises(AuditFailed, match="observed 0"):
        build_ingest_stage(IngestSettings(allow_download=False, kcore=20), synthetic_layout, "synthetic", log=quiet)
    assert folder_digests(synthetic_layout, TABLES) == before  # interactions and users passed, yet stay too
    for table in TABLES:
        [kept] = rejected_folders(synthetic_layout.asset_dir(table, "synthetic"))
        assert (kept / f"{table}.parquet").exists() and (failure in (kept / FAILURES_FILE).read_text()) == (table == "items")


def test_leaking_tool_indexes_are_not_published(synthetic_layout, monkeypatch):
    before = folder_digests(synthetic_layout, INDEX_ASSETS.values())
    real_report = index_stage.leakage_report

    def leaky(indexes, tasks):
        report = real_report(indexes, tasks)
        return {**report, "ok": False, "leaks": {**report["leaks"], "profiles_history": 2},
                "leaking_task_ids": ["synthetic/eval/7", "synthetic/eval/9"]}

    monkeypatch.setattr(index_stage, "leakage_report", leaky)
    with pytest.raises(AuditFailed) as failed:
        build_tool_indexes_stage(ToolIndexSettings(bpr_epochs=1, bpr_seed=7, sasrec_train_windows=500), synthetic_layout,
                                 "synthetic", log=quiet)
    assert "2 tasks whose target reaches their tools via profiles_history" in str(failed.value)
    assert "synthetic/eval/7" in str(failed.value)
    assert folder_digests(synthetic_layout, INDEX_ASSETS.values()) == before
    assert set(failed.value.rejections) == set(INDEX_ASSETS)
    monkeypatch.undo()
    assert index_stage.tool_leakage_report(synthetic_layout, "synthetic")["ok"]  # the published ones still pass


# -- the real Dagster assets ------------------------------------------------------------------------


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def published_state(project) -> dict[str, str]:
    """md5 of every published file and pointer under assets/ (rejected outputs aside), data.dvc,
    the DVC cache and the remote."""
    root = project.root
    state = {f"assets/{k}": v for k, v in file_digests(root / "assets").items() if ".rejected-" not in k}
    state.update({f"cache/{k}": v for k, v in file_digests(root / ".dvc" / "cache").items()})
    state.update({f"remote/{k}": v for k, v in file_digests(root / "dvc_remote").items()})
    if (root / "data.dvc").exists():
        state["data.dvc"] = hashlib.md5((root / "data.dvc").read_bytes()).hexdigest()
    return state


def materialize(project, dataset: str, selection=None, instance=None, **config):
    return dg.materialize(
        build_dataset_assets(dataset),
        selection=selection,
        resources=project.resources,
        run_config=config.get("run_config") or run_config(dataset),
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def failure_text(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run did not fail"
    return "\n".join(e.step_failure_data.error.to_string() for e in failures if e.step_failure_data.error)


@pytest.fixture(scope="module")
def movielens_project(tmp_path_factory, make_project):
    """A project that published a small real ML-1M slice (tables and protocol), and its good files."""
    project = make_project(tmp_path_factory.mktemp("wap") / "project")
    folder = project.paths.data_path / "ml-1m"
    write_small_movielens(folder)
    result = materialize(project, "ml-1m")
    assert result.success
    return project, {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def movielens(movielens_project):
    """The published ML-1M project; its raw files are put back after the test."""
    project, good_files = movielens_project
    yield project
    for name, content in good_files.items():
        (project.paths.data_path / "ml-1m" / name).write_bytes(content)


def test_an_empty_ratings_file_fails_the_run_and_changes_nothing(movielens):
    before = published_state(movielens)
    (movielens.paths.data_path / "ml-1m" / "ratings.dat").write_bytes(b"")
    result = materialize(movielens, "ml-1m")
    assert not result.success
    assert "ratings.dat" in failure_text(result)
    assert published_state(movielens) == before
    assert not result.get_asset_materialization_events()  # not even raw_dataset: data.dvc never moved


def test_a_header_only_item_file_fails_the_run_and_changes_nothing(project):
    folder = project.paths.data_path / "amazon-cds" / "recbole"
    folder.mkdir(parents=True)
    for name in ("Amazon_CDs.inter.gz", "Amazon_CDs.item.gz"):
        shutil.copy(require_shared("amazon-cds", "recbole", name), folder / name)
    tables = [keys.dataset_key("amazon-cds", name) for name in ("raw_dataset", *TABLES)]
    ops = {f"amazon_cds__{op}": IngestConfig(profile="smoke", allow_download=False) for op in ("raw_dataset", "ingest")}
    config = dg.RunConfig(ops=ops)
    assert materialize(project, "amazon-cds", selection=tables, run_config=config).success
    before = published_state(project)

    header = gzip.decompress((folder / "Amazon_CDs.item.gz").read_bytes()).split(b"\n")[0] + b"\n"
    (folder / "Amazon_CDs.item.gz").write_bytes(gzip.compress(header))
    result = materialize(project, "amazon-cds", selection=tables, run_config=config)
    assert not result.success
    assert "Amazon_CDs.item" in failure_text(result)
    assert published_state(project) == before
    assert not result.get_asset_materialization_events()


def test_a_failing_splits_audit_keeps_the_published_protocol(movielens, monkeypatch):
    splits_key = keys.dataset_key("ml-1m", "task_splits")
    folder = movielens.paths.asset_dir("task_splits", "ml-1m")
    before = published_state(movielens)
    failure = "expect_column_values_to_be_unique(task_id): 3 unexpected values e.g. ['ml-1m/eval/1']"
    monkeypatch.setattr(splits_stage, "validate_tasks", lambda *args: QualityResult("tasks", False, [failure], 9))

    # A different protocol, so the staged output differs from the published one.
    published_candidates = json.loads((folder / "protocol.json").read_text())["n_candidates"]
    staged_candidates = published_candidates + 5
    config = dg.RunConfig(ops={"ml_1m__task_splits": TaskSplitConfig(profile="smoke", n_candidates=staged_candidates)})
    result = materialize(movielens, "ml-1m", selection=[splits_key], run_config=config)
    assert not result.success
    assert failure in failure_text(result) and "published versions are unchanged" in failure_text(result)
    assert published_state(movielens) == before
    [evaluation] = result.get_asset_check_evaluations()  # Dagster shows the gate as the check's result
    assert evaluation.check_name == "protocol_quality" and not evaluation.passed
    assert failure in evaluation.metadata["failures"].value
    kept = rejected_folders(folder)[0]
    assert failure in (kept / FAILURES_FILE).read_text()
    assert pl.read_parquet(kept / "tasks_eval.parquet")["candidate_item_ids"].list.len().max() == staged_candidates
    assert pl.read_parquet(folder / "tasks_eval.parquet")["candidate_item_ids"].list.len().max() == published_candidates
    observation = next(e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION")
    assert observation.asset_key == splits_key


def test_two_runs_publishing_the_same_tables_queue_and_leave_a_consistent_version(project, monkeypatch):
    """Run A holds the tables' lock inside its stage until run B is seen waiting for it."""
    events: list[tuple[str, str]] = []
    b_waiting = threading.Event()
    real_stage, real_locks, real_track = dataset_defs.build_ingest_stage, publishing.artifact_locks, DVCVersioning.track

    def run_of(settings) -> str:
        return "A" if settings.kcore == 0 else "B"

    def stage(settings, *args, **kwargs):
        run = run_of(settings)
        events.append((run, "stage"))
        if run == "A":
            assert b_waiting.wait(120), "run B never waited for the lock"
        return real_stage(settings, *args, **kwargs)

    def locks(folders, lock_dir, log=None):
        def spy(message: str) -> None:
            if threading.current_thread().name == "B" and "waiting" in message:
                b_waiting.set()
            if log:
                log(message)

        return real_locks(folders, lock_dir, log=spy)

    def track(self, path):
        events.append((threading.current_thread().name, f"dvc add {Path(path).parent.name}"))
        return real_track(self, path)

    monkeypatch.setattr(dataset_defs, "build_ingest_stage", stage)
    monkeypatch.setattr(publishing, "artifact_locks", locks)
    monkeypatch.setattr(DVCVersioning, "track", track)
    ingest = [keys.dataset_key("synthetic", name) for name in ("raw_dataset", *TABLES)]
    results = {}

    def run(name: str, kcore: int) -> None:
        ops = {f"synthetic__{op}": IngestConfig(profile="smoke", allow_download=False, kcore=kcore)
               for op in ("raw_dataset", "ingest")}
        results[name] = materialize(project, "synthetic", selection=ingest, run_config=dg.RunConfig(ops=ops))

    first = threading.Thread(target=run, args=("A", 0), name="A")
    first.start()
    while ("A", "stage") not in events and first.is_alive():
        time.sleep(0.05)
    second = threading.Thread(target=run, args=("B", 20), name="B")
    second.start()
    first.join(300)
    second.join(300)
    assert results["A"].success and results["B"].success
    runs = [run for run, _ in events]
    assert runs == sorted(runs), events  # every step of A (stage, swap, dvc add) before any of B

    mlflow.set_tracking_uri(project.tracking_uri)
    logged = {(r.data.tags["dagster_run_id"], r.data.tags["asset"]): r.data.tags["dvc_md5"]
              for r in mlflow.search_runs(experiment_names=["recthinker"], output_format="list") if "dvc_md5" in r.data.tags}
    md5s = {}
    for name, result in results.items():
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.path[-1] in TABLES:
                md5 = materialization.metadata["dvc_md5"].value
                assert logged[(result.run_id, materialization.asset_key.to_user_string())] == md5
                md5s[(name, materialization.asset_key.path[-1])] = md5
    assert md5s[("A", "interactions")] != md5s[("B", "interactions")]  # the k-core made them differ

    from dvc.repo import Repo

    with Repo(str(project.root)) as repo:
        for table in TABLES:
            folder = project.paths.asset_dir(table, "synthetic")
            assert project.resources["dvc"].tracked_md5(folder) == md5s[("B", table)]  # the last run's version
            pointer = str(folder) + ".dvc"
            assert repo.status(targets=[pointer]) == {}  # the folder is the version its pointer records
            assert repo.status(targets=[pointer], cloud=True) == {}  # and the remote has it
            assert not [p for p in folder.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name]

