"""The data-side stage functions, called directly (no Dagster, DVC or MLflow) on the synthetic dataset."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import polars as pl
import pytest

from recthinker_dagster.artifacts import INDEX_ASSETS, TASK_SPLITS, ArtifactLayout, read_tasks
from recthinker_dagster.protocol import protocol_config_for
from recthinker_dagster.settings import IngestSettings, ProtocolSettings, TeacherSettings, ToolIndexSettings, load_profile
from recthinker_dagster.stages.indexes import (
    build_tool_indexes_stage,
    build_tool_suite_stage,
    flatten,
    tool_leakage_report,
)
from recthinker_dagster.stages.ingest import (
    build_ingest_stage,
    build_raw_dataset_stage,
    files_md5,
    jsonable,
    validate_published_table,
)
from recthinker_dagster.stages.result import Json, Markdown
from recthinker_dagster.stages.splits import build_task_splits_stage, validate_published_splits
from recthinker_dagster.stages.trajectories import (
    build_teacher_trajectories_stage,
    example_records,
    make_teacher,
    work_file_for,
)

DATASET = "synthetic"


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> ArtifactLayout:
    """A project with the synthetic dataset ingested, split (smoke protocol) and indexed."""
    layout = ArtifactLayout(tmp_path_factory.mktemp("stages"))
    build_ingest_stage(IngestSettings(allow_download=False), layout, DATASET, log=quiet)
    build_task_splits_stage(load_profile("smoke").protocol, layout, DATASET, log=quiet)
    build_tool_indexes_stage(ToolIndexSettings(bpr_epochs=2, sasrec_train_windows=500), layout, DATASET, log=quiet)
    return layout


def test_raw_dataset_of_the_synthetic_source_has_no_files(tmp_path):
    raw = build_raw_dataset_stage(IngestSettings(allow_download=False), ArtifactLayout(tmp_path), DATASET, {"profile": "smoke"})
    assert raw.files == [] and raw.files_md5 == "synthetic"
    assert raw.metrics["files"] == 0 and raw.metrics["bytes"] == 0
    assert raw.params == {"dataset": DATASET, "data_dir": str(tmp_path / "data"), "profile": "smoke",
                          "allow_download": False, "kcore": None, "metadata_warn_share": 0.45, "metadata_min_share": 0.25}


def test_files_md5_ignores_the_order_but_not_the_bytes(tmp_path):
    (tmp_path / "a.dat").write_text("1")
    (tmp_path / "b.dat").write_text("2")
    files = [tmp_path / "a.dat", tmp_path / "b.dat"]
    first = files_md5(files)
    assert files_md5(files[::-1]) == first
    (tmp_path / "b.dat").write_text("3")
    assert files_md5(files) != first


def test_ingest_writes_each_table_with_its_statistics(tmp_path):
    layout = ArtifactLayout(tmp_path)
    result = build_ingest_stage(IngestSettings(allow_download=False), layout, DATASET, log=quiet,
                                extra_params={"profile": "smoke"})
    assert list(result.tables) == ["interactions", "items", "users"]
    for name, artifact in result.tables.items():
        frame = pl.read_parquet(artifact.folder / f"{name}.parquet")
        assert artifact.folder == layout.asset_dir(name, DATASET)
        assert artifact.metrics["rows"] == artifact.metadata["rows"] == frame.height > 0
        assert artifact.params == {"dataset": DATASET, "profile": "smoke", "allow_download": False, "kcore": None,
                                   "metadata_warn_share": 0.45, "metadata_min_share": 0.25}
        assert isinstance(artifact.metadata["preview"], Markdown) and isinstance(artifact.metadata["cleaning"], Json)
        assert validate_published_table(layout, DATASET, name).success
    interactions = result.tables["interactions"]
    assert interactions.metadata["users"] > 0 and "rating_mean" in interactions.metadata
    assert "with_metadata" in result.tables["items"].metadata
    assert not [p for p in (tmp_path / "assets" / "interactions").iterdir() if p.name.startswith(".")]


def test_task_splits_reproduce_the_profile_protocol(layout):
    settings = load_profile("smoke").protocol
    folder = layout.asset_dir("task_splits", DATASET)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["train_interactions.parquet", "protocol.json", *(f"tasks_{s}.parquet" for s in TASK_SPLITS)]
    )
    expected = protocol_config_for(DATASET, n_candidates=10, seed=2026, n_eval_users_per_group=10,
                                   n_valid_users_per_group=5, n_train_users_per_group=20, prompt_history_len=10)
    assert settings.for_dataset(DATASET) == expected
    assert json.loads((folder / "protocol.json").read_text()) == jsonable(expected)
    assert validate_published_splits(layout, DATASET).success


def test_task_splits_metrics_count_the_tasks(tmp_path, layout):
    copy = ArtifactLayout(tmp_path)
    build_ingest_stage(IngestSettings(allow_download=False), copy, DATASET, log=quiet)
    result = build_task_splits_stage(ProtocolSettings(n_eval_users_per_group=3, n_valid_users_per_group=2,
                                                      n_train_users_per_group=4), copy, DATASET, log=quiet)
    artifact = result.artifact
    assert result.tasks == artifact.metrics["tasks"] == read_tasks(copy, DATASET).height == 2 * (3 + 2 + 4)
    assert artifact.metrics["tasks_eval_dense"] == 3 and artifact.metrics["tasks_train_sparse"] == 4
    assert artifact.params["n_eval_users_per_group"] == 3 and artifact.params["dataset"] == DATASET
    assert set(artifact.texts) == {"protocol.json"}


def test_tool_indexes_are_published_one_folder_each_and_do_not_leak(layout):
    result = build_tool_indexes_stage(ToolIndexSettings(bpr_epochs=2, sasrec_train_windows=500), layout, DATASET, log=quiet)
    assert set(result.indexes) == set(INDEX_ASSETS)
    for name, artifact in result.indexes.items():
        assert artifact.folder == layout.asset_dir(INDEX_ASSETS[name], DATASET) and artifact.folder.is_dir()
        assert artifact.params["bpr_epochs"] == 2 and artifact.params["index_interactions"] == result.index_interactions
    bprmf = result.indexes["bprmf"]
    assert len(bprmf.series["train_loss"]) == 2 and bprmf.metrics["valid_ndcg@10"] >= 0
    assert not result.indexes["catalog"].series
    assert tool_leakage_report(layout, DATASET)["ok"]


def test_tool_suite_lists_every_tool(layout):
    artifact = build_tool_suite_stage(layout, DATASET)
    document = json.loads((artifact.folder / "tools.json").read_text())
    assert artifact.metrics["tools"] == len(document["tools"]) > 0
    assert artifact.texts["tools.json"] == (artifact.folder / "tools.json").read_text()
    assert all(f"`{tool['function']['name']}`" in artifact.metadata["tools"] for tool in document["tools"])


def test_teacher_trajectories_resume_from_their_work_file(layout):
    settings = replace(load_profile("smoke").teacher, samples_per_task=2, batch_size=8)
    first = build_teacher_trajectories_stage(settings, layout, DATASET, log=quiet)
    n_train = read_tasks(layout, DATASET, ("train",)).height
    published = first.artifact.folder / "trajectories.jsonl"
    assert first.artifact.metadata["trajectories"] == len(published.read_text().splitlines()) == 2 * n_train
    assert first.artifact.cleanup == (first.work_file,) and first.work_file.exists()  # the publisher deletes it
    assert first.work_file.parent == layout.work_dir("teacher_trajectories", DATASET)
    assert first.artifact.params["fingerprint"] == first.work_file.stem
    summary = json.loads((first.artifact.folder / "summary.json").read_text())
    assert summary["settings"] == asdict(settings) and "out_path" not in summary

    again = build_teacher_trajectories_stage(settings, layout, DATASET, log=quiet)
    assert again.summary.n_resumed == 2 * n_train and again.summary.n_generated == 0
    assert again.work_file == first.work_file


def test_teacher_trajectories_record_their_token_counts_and_table_agreement(layout, smollm2_tokenizer):
    settings = replace(load_profile("smoke").teacher, samples_per_task=1, batch_size=8)
    result = build_teacher_trajectories_stage(settings, layout, DATASET, log=quiet, tokenizer=smollm2_tokenizer)
    tokens = result.artifact.metadata["conversation_tokens"].value
    assert 300 < tokens["median"] <= tokens["p95"] <= tokens["max"] <= 2200
    assert result.artifact.metrics["tokens_median"] == tokens["median"]
    histogram = str(result.artifact.metadata["token_histogram"])
    assert histogram.startswith("| tokens | conversations |")
    assert sum(int(row.split("|")[2]) for row in histogram.splitlines()[2:]) == result.artifact.metadata["trajectories"]
    assert result.artifact.metadata["answer_matches_last_table"] == 1.0  # the scripted teacher reads its table


def test_teacher_fingerprint_keys_match_the_resolved_config_of_old():
    # The work file name hashes these keys: keep them, or every unfinished run restarts.
    assert list(asdict(TeacherSettings())) == [
        "teacher", "samples_per_task", "max_turns", "max_tool_calls", "prompt_history_len",
        "batch_size", "seed", "llm_base_url", "llm_model", "temperature",
    ]


def test_work_file_depends_on_settings_and_tasks(tmp_path):
    layout = ArtifactLayout(tmp_path)
    base = work_file_for(layout, DATASET, TeacherSettings(), ["t1", "t2"])
    assert base == work_file_for(layout, DATASET, TeacherSettings(), ["t2", "t1"])
    assert base != work_file_for(layout, DATASET, TeacherSettings(samples_per_task=2), ["t1", "t2"])
    assert base != work_file_for(layout, DATASET, TeacherSettings(), ["t1"])


def test_work_file_changes_with_the_scripted_teachers_version_and_weights(tmp_path, monkeypatch):
    from recthinker_dagster.stages import trajectories

    layout = ArtifactLayout(tmp_path)
    base = work_file_for(layout, DATASET, TeacherSettings(), ["t1"])
    monkeypatch.setattr(trajectories, "TUNED", {"ml-1m": {"any": {"bprmf": 1.0}}})
    retuned = work_file_for(layout, DATASET, TeacherSettings(), ["t1"])
    monkeypatch.setattr(trajectories, "PRODUCER", "scripted-investigator-v0")
    assert len({base, retuned, work_file_for(layout, DATASET, TeacherSettings(), ["t1"])}) == 3


def test_unknown_teacher_is_an_error():
    with pytest.raises(ValueError, match="unknown teacher 'oracle'"):
        make_teacher(TeacherSettings(teacher="oracle"))


def test_examples_take_one_per_group_first():
    records = [{"group": g, "task_id": f"t{i}"} for i, g in enumerate(["sparse", "sparse", "dense", "sparse"])]
    assert [r["task_id"] for r in example_records(records)] == ["t0", "t2", "t1"]


def test_flatten_prefixes_nested_keys():
    assert flatten({"bpr": {"dim": 64, "seed": 0}, "relations_k": 20}) == {"bpr_dim": 64, "bpr_seed": 0, "relations_k": 20}
