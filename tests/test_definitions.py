"""The code location loads, shows the whole graph, and its jobs select everything."""

from __future__ import annotations

import dagster as dg
import pytest

from recthinker_dagster.definitions import build_definitions, defs
from recthinker_dagster.settings import PROFILE_NAMES


def _asset_keys(definitions: dg.Definitions) -> set[str]:
    graph = definitions.resolve_asset_graph()
    return {key.to_user_string() for key in graph.get_all_asset_keys()}


def test_default_definitions_load_with_both_datasets():
    keys = _asset_keys(defs)
    for prefix in ("ml_1m", "amazon_cds"):
        for asset in ("raw_dataset", "interactions", "items", "users", "task_splits", "cf_model", "tool_suite",
                      "teacher_trajectories", "evaluation"):
            assert f"{prefix}/{asset}" in keys
    for asset in ("base_model", "filtered_trajectories", "sft_model", "rl_model", "registered_model"):
        assert asset in keys


def test_every_table_and_the_protocol_has_a_blocking_check():
    graph = defs.resolve_asset_graph()
    checks = {key.asset_key.to_user_string(): key.name for key in graph.asset_check_keys}
    for prefix in ("ml_1m", "amazon_cds"):
        assert checks[f"{prefix}/interactions"] == "interactions_quality"
        assert checks[f"{prefix}/task_splits"] == "protocol_quality"
        assert checks[f"{prefix}/tool_suite"] == "no_target_leakage"
    assert checks["filtered_trajectories"] == "sft_examples_quality"
    for check_def in defs.asset_checks or []:
        for spec in check_def.check_specs:
            # the promotion gate only warns: a challenger is a normal outcome, not a broken pipeline
            assert spec.blocking == (spec.name != "promotion_gate"), spec.key


def test_one_job_per_profile_selects_the_whole_graph_and_one_the_think_branch():
    all_keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    think = {dg.AssetKey(["ml_1m", "think_trajectories"]), dg.AssetKey(["amazon_cds", "think_trajectories"]),
             dg.AssetKey("recone_sft_model"), dg.AssetKey("recone_model"), dg.AssetKey("reczero_model")}
    assert think <= all_keys
    for profile in PROFILE_NAMES:
        job = defs.resolve_job_def(f"pipeline_{profile}")
        assert job.asset_layer.selected_asset_keys == all_keys - think  # the agent never waits for RecZero/RecOne
        assert job.tags.get("profile") == profile
        assert defs.resolve_job_def(f"think_{profile}").asset_layer.selected_asset_keys == think


def test_the_headline_job_scores_every_system_on_the_evaluation_assets():
    from recthinker_dagster.defs.config import EvaluationConfig
    from recthinker_dagster.defs.jobs import HEADLINE_LLM_TASKS, HEADLINE_SYSTEMS

    evaluations = {dg.AssetKey(["ml_1m", "evaluation"]), dg.AssetKey(["amazon_cds", "evaluation"])}
    assert {"sft@logits", "sft_rl@logits", "reczero", "recone", "fusion", "sasrec", "teacher"} <= set(HEADLINE_SYSTEMS)
    for profile in PROFILE_NAMES:
        assert defs.resolve_job_def(f"headline_{profile}").asset_layer.selected_asset_keys == evaluations
        settings = EvaluationConfig(profile=profile, systems=list(HEADLINE_SYSTEMS),
                                    llm_tasks=HEADLINE_LLM_TASKS[profile]).settings()
        assert settings.systems == HEADLINE_SYSTEMS and settings.llm_tasks == HEADLINE_LLM_TASKS[profile]
    assert HEADLINE_LLM_TASKS["demo"] >= 100  # >= 50 per group: the paper's comparison needs that many


def test_the_think_branch_follows_recone_and_reczero():
    graph = defs.resolve_asset_graph()

    def parents_of(*key):
        return {k.to_user_string() for k in graph.get(dg.AssetKey(list(key))).parent_keys}

    assert {"ml_1m/think_trajectories", "amazon_cds/think_trajectories"} <= parents_of("recone_sft_model")
    assert "recone_sft_model" in parents_of("recone_model")
    assert "base_model" in parents_of("reczero_model") and "recone_sft_model" not in parents_of("reczero_model")


def test_datasets_are_configurable():
    keys = _asset_keys(build_definitions(datasets=["synthetic"]))
    assert "synthetic/interactions" in keys
    assert not any(key.startswith("ml_1m/") for key in keys)


def test_dependencies_follow_the_design_graph():
    graph = defs.resolve_asset_graph()

    def parents_of(*key):
        return {k.to_user_string() for k in graph.get(dg.AssetKey(list(key))).parent_keys}

    assert {"ml_1m/teacher_trajectories", "amazon_cds/teacher_trajectories"} <= parents_of("filtered_trajectories")
    assert {"filtered_trajectories", "base_model"} <= parents_of("sft_model")
    assert "sft_model" in parents_of("rl_model")
    assert {"rl_model", "ml_1m/evaluation", "amazon_cds/evaluation"} <= parents_of("registered_model")
    assert {"sft_model", "rl_model", "ml_1m/tool_suite"} <= parents_of("ml_1m", "evaluation")
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey(["ml_1m", "task_splits"])).parent_keys}
    assert parents == {"ml_1m/interactions", "ml_1m/items"}
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey(["ml_1m", "interactions"])).parent_keys}
    assert parents == {"ml_1m/raw_dataset"}


def test_the_executor_is_one_switch_and_the_heavy_stages_share_a_pool(monkeypatch):
    from recthinker_dagster.definitions import configured_executor
    from recthinker_dagster.defs.keys import HEAVY_POOL

    monkeypatch.delenv("RECTHINKER_EXECUTOR", raising=False)
    assert configured_executor() is dg.in_process_executor
    monkeypatch.setenv("RECTHINKER_EXECUTOR", "multiprocess")
    monkeypatch.setenv("RECTHINKER_MAX_CONCURRENT", "3")
    assert configured_executor().name == "multiprocess"
    assert build_definitions(["ml-1m"]).executor.name == "multiprocess"
    monkeypatch.setenv("RECTHINKER_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="RECTHINKER_EXECUTOR must be one of"):
        configured_executor()

    graph = defs.resolve_asset_graph()
    heavy = {key.to_user_string() for key in graph.get_all_asset_keys() if HEAVY_POOL in graph.get(key).pools}
    assert heavy == {"sft_model", "rl_model", "ml_1m/evaluation", "amazon_cds/evaluation", "recone_sft_model",
                     "recone_model", "reczero_model"}


def test_the_data_job_selects_every_dataset_branch_without_training():
    graph = defs.resolve_asset_graph()
    selected = {k.to_user_string() for k in defs.resolve_job_def("data_demo").asset_layer.selected_asset_keys}
    for prefix in ("ml_1m", "amazon_cds"):
        assert {f"{prefix}/interactions", f"{prefix}/tool_suite", f"{prefix}/teacher_trajectories"} <= selected
        assert f"{prefix}/evaluation" not in selected
    assert "base_model" in selected  # the teacher trajectories count tokens with its tokenizer
    assert not selected & {"sft_model", "rl_model", "filtered_trajectories", "registered_model"}
    branches = selected - {"base_model"}
    assert all(graph.get(dg.AssetKey(k.split("/"))).group_name in ("ml_1m", "amazon_cds") for k in branches)


def test_every_jobs_config_is_valid_for_its_selection():
    """A job's config naming an op it does not select is an error Dagster raises only at launch."""
    for job in defs.resolve_all_job_defs():
        if job.name.startswith(("pipeline_", "think_", "headline_", "data_")):
            assert dg.validate_run_config(job).get("ops"), job.name
