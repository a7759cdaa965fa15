"""The whole pipeline, end to end, as one real Dagster run of ``pipeline_smoke`` on the synthetic
dataset: ingestion, tools, teacher trajectories, filtering (with its blocking check), SFT and
GRPO, the evaluation of every system, registration and promotion (slow: about two minutes on 2
CPU cores).

The base model is the tiny answering model of ``tests/support/tiny_models.py`` with SmolLM2's
tokenizer: the chain's wiring is under test here, and every stage runs its real code on it
about fifty times faster than on SmolLM2-135M. The demo run (``scripts/run_pipeline.sh``) and
the model tests run the real SmolLM2."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import polars as pl
import pytest

from recthinker_dagster.definitions import build_definitions
from recthinker_dagster.defs.config import (
    BaseModelConfig,
    EvaluationConfig,
    FilterStageConfig,
    IngestConfig,
    RLStageConfig,
    SFTTrainingConfig,
    TeacherConfig,
    ToolIndexesConfig,
)
from recthinker_dagster.defs.jobs import profile_run_config
from recthinker_dagster.settings import DEFAULT_SYSTEMS

pytestmark = pytest.mark.slow


def smoke_run_config() -> dg.RunConfig:
    """pipeline_smoke's own run config, with the few overrides a synthetic test run needs."""
    config = profile_run_config("smoke", ["synthetic"])
    config.ops.update({
        "synthetic__raw_dataset": IngestConfig(profile="smoke", allow_download=False),
        "synthetic__ingest": IngestConfig(profile="smoke", allow_download=False),
        "synthetic__tool_indexes": ToolIndexesConfig(profile="smoke", bpr_epochs=2, sasrec_train_windows=500),
        "synthetic__teacher_trajectories": TeacherConfig(profile="smoke", samples_per_task=2),
        "filtered_trajectories": FilterStageConfig(profile="smoke", min_examples=2),
        "sft_model": SFTTrainingConfig(profile="smoke", max_steps=1, learning_curve_sizes=["2"]),
        "rl_model": RLStageConfig(profile="smoke"),
        "synthetic__evaluation": EvaluationConfig(profile="smoke", n_bootstrap=100),
    })
    return config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, make_project, answering_base_model):
    project = make_project(tmp_path_factory.mktemp("smoke-project"))
    config = smoke_run_config()
    config.ops["base_model"] = BaseModelConfig(profile="smoke", source=str(answering_base_model))
    job = build_definitions(["synthetic"], resources=project.resources).resolve_job_def("pipeline_smoke")
    result = job.execute_in_process(run_config=config, instance=dg.DagsterInstance.ephemeral())
    return project, result


def test_filtered_trajectories_records_every_decision_and_passes_its_check(smoke_run):
    project, result = smoke_run
    assert result.success
    folder = project.paths.asset_dir("filtered_trajectories")
    decisions = pl.read_parquet(folder / "decisions.parquet")
    teacher = (project.paths.asset_dir("teacher_trajectories", "synthetic") / "trajectories.jsonl").read_text().splitlines()
    assert decisions.height == len(teacher)  # every trajectory judged
    assert (decisions.filter(~pl.col("kept"))["reasons"].str.len_chars() > 0).all()  # every drop has a reason
    kept = [json.loads(line) for line in (folder / "trajectories.jsonl").read_text().splitlines()]
    assert len(kept) == decisions["kept"].sum() >= 2
    assert len({r["task_id"] for r in kept}) == len(kept)  # one per task
    materialization = result.asset_materializations_for_node("filtered_trajectories")[0]
    assert materialization.metadata["kept"].value == len(kept)
    assert "| `low_rank` |" in materialization.metadata["dropped_by_reason"].value
    assert set(materialization.metadata["by_group"].value) == {"sparse", "dense"}
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "sft_examples_quality")
    assert check.passed, check.metadata


def test_sft_model_trains_validates_and_is_versioned(smoke_run):
    project, result = smoke_run
    folder = project.paths.asset_dir("sft_model")
    assert (folder / "adapter" / "adapter_config.json").exists()
    assert (folder / "adapter" / "adapter_model.safetensors").exists()
    validation = json.loads((folder / "validation.json").read_text())
    assert "sft_model" in validation and "base_model" not in validation  # smoke leaves the base model to the evaluation
    overall = validation["sft_model"]["overall"]
    assert overall["n_tasks"] == 2 and 0.0 <= overall["ndcg@10"] <= 1.0 and "valid_rate" in overall
    materialization = result.asset_materializations_for_node("sft_model")[0]
    assert materialization.metadata["global_step"].value == 1
    assert materialization.metadata["examples"].value >= 1
    assert materialization.metadata["dvc_md5"].value == project.resources["dvc"].tracked_md5(folder)
    assert "| sft_model | synthetic |" in materialization.metadata["validation"].value
    # the finished run's checkpoints are gone; only the published adapter remains
    assert not any((project.root / ".work" / "sft_model").glob("*/checkpoints"))
    client = mlflow.MlflowClient(project.tracking_uri)
    run = client.get_run(materialization.metadata["mlflow_run_id"].value)
    assert run.data.params["recipe_digest"] and "final_loss" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0]
    assert "valid_sft_model_overall_ndcg_at_10" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts
    # the learning-curve option: one more adapter on 2 trajectories, validated, in the asset and MLflow
    assert (folder / "learning_curve" / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "| 2 |" in materialization.metadata["learning_curve"].value
    assert "curve_n2_ndcg_at_10" in run.data.metrics
    assert run.info.status == "FINISHED"


def test_rl_model_runs_grpo_from_the_sft_policy_and_logs_health(smoke_run):
    project, result = smoke_run
    folder = project.paths.asset_dir("rl_model")
    assert (folder / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["seconds_per_step"] > 0
    step = metrics["steps"][-1]
    assert step["frac_reward_zero_std"] < 1.0 and step["reward_std"] > 0  # rewards varied: the step had signal
    assert "rollout/sampler_logprob_abs_gap" in step  # exact tokens: sampler and trainer compared
    for key in ("reward", "reward_std", "frac_reward_zero_std", "tools/call_frequency", "tools/failure_rate",
                "completions/mean_length", "learning_rate", "rewards/ranking/mean", "rewards/tool_efficiency/std"):
        assert key in step, key
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["adapters"] == ["assets/sft_model/adapter", "assets/rl_model/adapter"]
    validation = json.loads((folder / "validation.json").read_text())
    assert set(validation) >= {"sft_model", "rl_model"}
    assert validation["sft_model"]["overall"]["n_tasks"] == validation["rl_model"]["overall"]["n_tasks"] > 0
    materialization = result.asset_materializations_for_node("rl_model")[0]
    client = mlflow.MlflowClient(project.tracking_uri)
    run = client.get_run(materialization.metadata["mlflow_run_id"].value)
    assert "time_generation_s" in run.data.metrics and "valid_rl_model_overall_ndcg_at_10" in run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["recthinker.pid"]  # the attempt, finished
    assert client.get_metric_history(run.info.run_id, "reward")


def test_evaluation_scores_classical_teacher_and_llm_systems(smoke_run):
    project, _ = smoke_run
    folder = project.paths.asset_dir("evaluation", "synthetic")
    rankings = pl.read_parquet(folder / "rankings.parquet")
    assert set(rankings["system"]) == set(DEFAULT_SYSTEMS)
    subset = rankings.filter(pl.col("in_llm_subset"))
    per_system = subset.group_by("system").agg(pl.col("task_id").sort())
    assert per_system["task_id"].n_unique() == 1  # every system on exactly the same subset
    report = (folder / "results.md").read_text()
    assert "| sft_rl | sparse |" in report and "| zero_shot | dense |" in report
    agents = json.loads((folder / "agents.json").read_text())
    assert agents["zero_shot"]["tool_calls_per_task"] == 0
    assert {"tool_calls_per_task", "invalid_answer_rate", "tokens_per_task", "latency_s_per_task"} <= set(agents["sft"])
    assert (folder / "tool_calls_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_the_agent_is_registered_and_the_promotion_gate_sets_its_alias(smoke_run):
    project, result = smoke_run
    registration = json.loads((project.paths.asset_dir("registered_model") / "registration.json").read_text())
    assert registration["adapters"] == ["assets/sft_model/adapter", "assets/rl_model/adapter"]
    gate = next(c for c in result.get_asset_check_evaluations() if c.check_name == "promotion_gate")
    client = mlflow.MlflowClient(project.tracking_uri)
    version = client.get_model_version(registration["model_name"], registration["version"])
    alias = "champion" if gate.passed else "challenger"
    assert alias in version.aliases and gate.metadata["alias"].value == alias
    assert version.tags["promotion_decision"] == ("promoted" if gate.passed else "rejected")
    assert "base" in version.tags["promotion_reasons"]  # the reasons name what it was compared with
    # promoted only if it beat the untrained base model with tools on the same eval tasks, and
    # is not worse beyond noise than the SFT policy it was trained from (evaluated as "sft")
    assert registration["start_system"] == "sft" and set(registration["start_per_task"]) == set(
        registration["candidate_per_task"])
    keeps_start = gate.metadata["keeps_start"].value
    assert isinstance(keeps_start, bool)
    assert gate.passed == (gate.metadata["candidate_value"].value > gate.metadata["base_value"].value and keeps_start)
