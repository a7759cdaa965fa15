"""The code location loads, shows the whole graph, and its jobs select everything."""

from __future__ import annotations

import dagster as dg

from recthinker_dagster.definitions import build_definitions, defs
from recthinker_dagster.profiles import PROFILES


def _asset_keys(definitions: dg.Definitions) -> set[str]:
    graph = definitions.resolve_asset_graph()
    return {key.to_user_string() for key in graph.get_all_asset_keys()}


def test_default_definitions_load_with_both_datasets():
    keys = _asset_keys(defs)
    for prefix in ("ml_1m", "amazon_cds"):
        for asset in ("raw_dataset", "interactions", "items", "users", "task_splits", "cf_model", "tool_suite", "teacher_trajectories", "evaluation"):
            assert f"{prefix}/{asset}" in keys
    assert "base_model" in keys


def test_every_table_and_the_protocol_has_a_blocking_check():
    graph = defs.resolve_asset_graph()
    checks = {key.asset_key.to_user_string(): key.name for key in graph.asset_check_keys}
    for prefix in ("ml_1m", "amazon_cds"):
        assert checks[f"{prefix}/interactions"] == "interactions_quality"
        assert checks[f"{prefix}/task_splits"] == "protocol_quality"
        assert checks[f"{prefix}/tool_suite"] == "no_target_leakage"
    for check_def in defs.asset_checks or []:
        for spec in check_def.check_specs:
            assert spec.blocking, spec.key


def test_one_job_per_profile_selects_the_whole_graph():
    all_keys = defs.resolve_asset_graph().get_all_asset_keys()
    for profile in PROFILES:
        job = defs.resolve_job_def(f"pipeline_{profile}")
        assert job.asset_layer.selected_asset_keys == set(all_keys)
        assert job.tags.get("profile") == profile


def test_datasets_are_configurable():
    keys = _asset_keys(build_definitions(datasets=["synthetic"]))
    assert "synthetic/interactions" in keys
    assert not any(key.startswith("ml_1m/") for key in keys)


def test_dependencies_follow_the_design_graph():
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey(["ml_1m", "task_splits"])).parent_keys}
    assert parents == {"ml_1m/interactions", "ml_1m/items"}
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey(["ml_1m", "interactions"])).parent_keys}
    assert parents == {"ml_1m/raw_dataset"}
