"""The evaluation and registration stages without Dagster or MLflow, on a tiny synthetic project.

The project holds what the earlier stages publish (the task splits and the five tool indexes
of a small synthetic dataset, laid out as ``assets/<asset>/synthetic``); the evaluation runs
the classical systems and the scripted teacher (no LLM), so the whole module takes seconds.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from recthinker_dagster.artifacts import TASK_SPLITS, ArtifactLayout, index_folders
from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.metrics import task_metrics
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.settings import EvaluationSettings, RegistrySettings
from recthinker_dagster.stages.evaluation import llm_settings, policy_for, run_evaluation_stage
from recthinker_dagster.stages.registration import (
    plan_registration,
    read_registration,
    serving_budgets,
    system_figures,
    write_registration,
)
from recthinker_dagster.stages.result import Json, Markdown
from recthinker_dagster.tools import build_all, index_interactions

DATASET = "synthetic"
SYSTEMS = ("random", "popularity", "itemknn", "bprmf", "fusion", "teacher")
SETTINGS = EvaluationSettings(systems=SYSTEMS, n_bootstrap=50, llm_tasks=4)
PNG = b"\x89PNG\r\n\x1a\n"


def publish_inputs(layout: ArtifactLayout) -> None:
    """The task splits and tool indexes of a small synthetic dataset, where the stages read them."""
    data = generate_synthetic(n_users=120, n_items=150, seed=3)
    protocol = protocol_config_for(DATASET, n_eval_users_per_group=6, n_valid_users_per_group=3,
                                   n_train_users_per_group=3, dense_min=60)  # both groups in 120 users
    splits = build_task_splits(data.interactions, protocol, DATASET)
    folder = layout.asset_dir("task_splits", DATASET)
    folder.mkdir(parents=True)
    splits.train_interactions.write_parquet(folder / "train_interactions.parquet")
    for split in TASK_SPLITS:
        splits.tasks.filter(pl.col("split") == split).write_parquet(folder / f"tasks_{split}.parquet")
    indexes = build_all(index_interactions(splits.train_interactions, splits.tasks), data.items, data.users,
                        splits.tasks.filter(pl.col("split") == "valid"), {"bpr_epochs": 1, "sasrec_train_windows": 500})
    for name, index_folder in index_folders(layout, DATASET).items():
        getattr(indexes, name).save(index_folder)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    layout = ArtifactLayout(tmp_path_factory.mktemp("project"))
    publish_inputs(layout)
    messages: list[str] = []
    return layout, run_evaluation_stage(SETTINGS, layout, DATASET, profile="smoke", log=messages.append), messages


def test_evaluation_writes_rankings_summaries_report_and_plot(evaluated):
    layout, result, messages = evaluated
    folder = layout.asset_dir("evaluation", DATASET)
    assert result.artifact.folder == folder
    eval_tasks = pl.read_parquet(layout.asset_dir("task_splits", DATASET) / "tasks_eval.parquet")
    assert result.eval_tasks == eval_tasks.height and result.llm_subset_tasks == 4

    rankings = pl.read_parquet(folder / "rankings.parquet")
    assert rankings.height == len(SYSTEMS) * eval_tasks.height
    assert rankings["system"].unique(maintain_order=True).to_list() == list(SYSTEMS)
    assert rankings.group_by("system").agg(pl.col("in_llm_subset").sum())["in_llm_subset"].to_list() == [4] * len(SYSTEMS)
    for row in rankings.head(10).iter_rows(named=True):  # the saved rankings reproduce the metrics
        assert task_metrics(row["ranking"], row["target_item_id"])["ndcg@10"] == row["ndcg@10"]

    summary = pl.read_parquet(folder / "summary.parquet")
    for scope in ("all", "llm_subset"):
        scoped = summary.filter(pl.col("tasks") == scope)
        assert sorted(scoped["system"].unique()) == sorted(SYSTEMS)
        assert set(scoped["group"]) == {"sparse", "dense"}
    assert summary.filter(pl.col("tasks") == "llm_subset")["n_tasks"].sum() == 4 * len(SYSTEMS)
    assert summary["n_candidates"].unique().to_list() == [10]  # every table states N

    report = (folder / "results.md").read_text()
    assert report == result.report
    assert f"## All {eval_tasks.height} eval tasks" in report and "## Every system on the same 4 eval tasks" in report
    assert "N = 10 candidates per task" in report.splitlines()[0] and report.count("N = 10 candidates per task") == 3
    assert all(f"| {system} | sparse |" in report and f"| {system} | dense |" in report for system in SYSTEMS)
    agents = json.loads((folder / "agents.json").read_text())
    assert list(agents) == ["teacher"] and agents["teacher"]["tool_calls_per_task"] > 0  # the only agent
    assert agents == result.agent_figures
    assert (folder / "ndcg10_by_system.png").read_bytes()[:8] == PNG
    assert (folder / "tool_calls_histogram.png").read_bytes()[:8] == PNG
    assert any("popularity scored" in m for m in messages)


def test_evaluation_figures_for_the_publisher(evaluated):
    layout, result, _ = evaluated
    artifact = result.artifact
    assert artifact.params == {"dataset": DATASET, "systems": ",".join(SYSTEMS), "profile": "smoke",
                               "eval_tasks": result.eval_tasks, "n_candidates": 10, "llm_tasks": 4, "llm_max_turns": 6,
                               "llm_max_tool_calls": 8, "llm_max_new_tokens": 384, "llm_batch_size": 32,
                               "llm_prompt_history_len": 10, "llm_answer_mode": "generate"}
    subset = result.subset_summaries["popularity"].filter(pl.col("group") == "dense").row(0, named=True)
    assert artifact.metrics["subset_popularity_dense_ndcg@10"] == subset["ndcg@10"]
    assert {"all_bprmf_sparse_mrr", "seconds_itemknn", "seconds_teacher", "teacher_tool_calls_per_task"} <= set(
        artifact.metrics)
    assert isinstance(artifact.metadata["results"], Markdown) and artifact.metadata["results"] == result.report
    assert isinstance(artifact.metadata["agents"], Json) and artifact.metadata["agents"].value == result.agent_figures
    assert artifact.metadata["plot"] == artifact.folder / "ndcg10_by_system.png"
    assert artifact.metadata["llm_subset_tasks"] == 4 and artifact.texts == {"results.md": result.report}
    headline = artifact.metadata["headline"].value  # the teacher's rows (no LLM system here)
    assert [(row["group"], row["comparison"]) for row in headline] == [
        ("sparse", "teacher vs strongest baseline"), ("dense", "teacher vs strongest baseline")]
    assert artifact.metrics["headline_dense_teacher_p_value"] == headline[1]["test"]["p_value"]


def test_llm_settings_are_the_budgets_the_llm_systems_run_with():
    settings = EvaluationSettings(llm_tasks=3, llm_max_turns=2, max_tool_calls=5, llm_max_new_tokens=64,
                                  prompt_history_len=7, max_turns=9, llm_batch_size=4)
    assert llm_settings(settings) == {"tasks": 3, "max_turns": 2, "max_tool_calls": 5, "max_new_tokens": 64,
                                      "batch_size": 4, "prompt_history_len": 7, "answer_mode": "generate"}
    with pytest.raises(ValueError, match="llm_batch_size must be >= 1"):
        EvaluationSettings(llm_batch_size=0)


def test_policies_name_the_asset_to_materialize(tmp_path):
    layout = ArtifactLayout(tmp_path)
    assert policy_for("zero_shot", layout).base_model == layout.asset_dir("base_model")
    with pytest.raises(FileNotFoundError, match="materialize sft_model first"):
        policy_for("sft", layout)
    (layout.asset_dir("sft_model") / "adapter").mkdir(parents=True)
    (layout.asset_dir("sft_model") / "lineage.json").write_text(json.dumps({"base_model": "models/backbone"}))
    policy = policy_for("sft", layout)
    assert policy.base_model == tmp_path / "models" / "backbone"  # the backbone the adapter was trained on
    assert policy.adapters == (layout.asset_dir("sft_model") / "adapter",)
    with pytest.raises(FileNotFoundError, match="materialize rl_model first"):
        policy_for("sft_rl", layout)


def fake_policy(layout: ArtifactLayout) -> None:
    """A published RL policy (lineage and adapter folders) and DVC pointers, without any model."""
    for asset in ("base_model", "sft_model/adapter", "rl_model/adapter"):
        (layout.root / "assets" / asset).mkdir(parents=True, exist_ok=True)
    (layout.asset_dir("rl_model") / "lineage.json").write_text(json.dumps(
        {"base_model": "assets/base_model", "adapters": ["assets/sft_model/adapter", "assets/rl_model/adapter"]}))
    (layout.root / "assets" / "base_model.dvc").write_text("outs:\n- md5: base123.dir\n  path: base_model\n")
    (layout.root / "assets" / "rl_model.dvc").write_text("outs:\n- md5: rl456.dir\n  path: rl_model\n")


def test_registration_plans_from_the_evaluation_and_the_lineage(evaluated):
    layout, _, _ = evaluated
    fake_policy(layout)
    # the classical systems stand in for the trained and the base system
    settings = RegistrySettings(candidate_system="sft_rl", baseline_system="random", llm_max_turns=2)
    with pytest.raises(ValueError, match="no figures for system 'sft_rl'"):
        plan_registration(settings, layout, [DATASET])
    figures = system_figures(layout, [DATASET], "popularity", "ndcg@10")
    assert set(figures[DATASET]) == {"sparse", "dense"}
    assert serving_budgets(settings) == {"max_turns": 2, "max_tool_calls": 8, "max_new_tokens": 384,
                                         "prompt_history_len": 10, "max_candidates": settings.max_candidates,
                                         "max_history_len": settings.max_history_len}
    with pytest.raises(FileNotFoundError, match="materialize ml_1m/evaluation first"):
        system_figures(layout, ["ml-1m"], "popularity", "ndcg@10")
    with pytest.raises(ValueError, match="candidate_system must be one of"):
        plan_registration(RegistrySettings(candidate_system="popularity"), layout, [DATASET])


def test_registration_record(evaluated, monkeypatch):
    from recthinker_dagster.stages import registration

    layout, _, _ = evaluated
    fake_policy(layout)
    # the evaluation ran classical systems only: let popularity stand in for the trained policy
    monkeypatch.setattr(registration, "POLICY_ASSET", {"popularity": "rl_model"})
    settings = RegistrySettings(candidate_system="popularity", baseline_system="random", margin=0.01)
    monkeypatch.setattr(registration, "START_SYSTEM", {"popularity": "sft"})  # not evaluated: not compared
    plan = plan_registration(settings, layout, [DATASET])
    assert plan.start_system is None and plan.start is None and plan.start_per_task is None
    monkeypatch.setattr(registration, "START_SYSTEM", {"popularity": "itemknn"})
    plan = plan_registration(settings, layout, [DATASET])
    assert plan.start_system == "itemknn"
    assert plan.start == system_figures(layout, [DATASET], "itemknn", "ndcg@10")
    assert set(plan.start_per_task) == set(plan.candidate_per_task) and plan.candidate_per_task
    assert plan.base_model == {"path": str(layout.root / "assets" / "base_model"), "md5": "base123.dir"}
    assert plan.adapters == [layout.asset_dir("sft_model") / "adapter", layout.asset_dir("rl_model") / "adapter"]
    assert plan.policy_md5 == "rl456.dir"
    assert set(plan.tool_indexes[DATASET]) == {"catalog", "profiles", "bprmf", "relations", "similar_users"}
    assert plan.tool_indexes[DATASET]["catalog"]["md5"] == ""  # not tracked by DVC here
    assert set(plan.metrics) == {f"{DATASET}/sparse/ndcg@10", f"{DATASET}/dense/ndcg@10"}
    assert len(plan.input_example[0]["candidate_item_ids"]) == 5

    artifact = write_registration(settings, layout, plan, "7", "run-1")
    record = read_registration(layout)
    assert record["version"] == "7" and record["margin"] == 0.01 and record["policy_md5"] == "rl456.dir"
    assert record["candidate"] == plan.candidate and record["base"] == plan.base
    assert record["start_system"] == "itemknn" and record["start"] == plan.start
    assert record["start_per_task"] == plan.start_per_task
    assert record["adapters"] == ["assets/sft_model/adapter", "assets/rl_model/adapter"]
    assert artifact.metadata["model_uri"] == "models:/recthinker-agent/7"
    assert artifact.params["version"] == "7" and artifact.metrics == plan.metrics


def test_a_malformed_dvc_pointer_of_a_referenced_folder_is_a_clear_error(tmp_path):
    from recthinker_dagster.serving.pyfunc import MissingModelArtifact, resolve_reference

    folder = tmp_path / "assets" / "user_profiles" / "ml-1m"
    folder.mkdir(parents=True)
    pointer = folder.with_name("ml-1m.dvc")
    pointer.write_text("outs: [")
    ref = {"asset": "user_profiles", "dataset": "ml-1m", "path": str(folder), "md5": "ab.dir"}
    with pytest.raises(MissingModelArtifact, match=r"ml-1m\.dvc is malformed") as caught:
        resolve_reference(ref, "profiles", "include_tool_indexes")
    assert "recthinker restore user_profiles/ml-1m ab.dir" in str(caught.value)
    assert resolve_reference({**ref, "md5": ""}, "profiles", "include_tool_indexes") == folder  # nothing to check


def test_the_report_is_rebuilt_exactly_from_the_saved_rankings(evaluated):
    from recthinker_dagster.evaluation.results import read_rankings, rebuild_report

    layout, result, _ = evaluated
    folder = layout.asset_dir("evaluation", DATASET)
    _, saved = read_rankings(folder / "rankings.parquet")
    assert (saved.dataset, saved.n_candidates, saved.n_bootstrap, saved.seed) == (DATASET, 10, 50, SETTINGS.seed)
    assert rebuild_report(folder) == (folder / "results.md").read_text() == result.report
    assert "| sparse | teacher vs strongest baseline | teacher |" in result.report  # no LLM system: the teacher's row
    assert "### Cost per task" in result.report and "| teacher | 4 |" in result.report

def test_recthinker_report_checks_the_saved_report_against_the_rankings(evaluated, tmp_path, capsys):
    import shutil

    from recthinker_dagster.cli import main
    from recthinker_dagster.evaluation.results import read_rankings, write_rankings

    layout, result, _ = evaluated
    copy = ArtifactLayout(tmp_path)
    shutil.copytree(layout.asset_dir("evaluation", DATASET), copy.asset_dir("evaluation", DATASET))
    assert main(["report", "--root", str(tmp_path), "--check"]) == 0
    assert capsys.readouterr().out == result.report + "\n"
    assert main(["report", "--root", str(tmp_path), "--out", str(tmp_path / "results.md")]) == 0
    document = (tmp_path / "results.md").read_text()
    assert document.startswith("Rebuilt on ") and "rankings of: synthetic" in document and document.endswith(result.report)
    assert "## Training cost" not in document  # no trained system published here
    for asset, metrics in [("sft_model", {"global_step": 64, "train_seconds": 1800.0, "n_examples": 256}),
                           ("rl_model", {"global_step": 8, "train_seconds": 1500.0, "n_tasks": 4})]:
        copy.asset_dir(asset).mkdir(parents=True)
        (copy.asset_dir(asset) / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", "--root", str(tmp_path), "--out", str(tmp_path / "results.md"),
                 "--produced-by", "bash scripts/headline_table.sh demo"]) == 0
    document = (tmp_path / "results.md").read_text()
    assert document.startswith("The rankings were produced by `bash scripts/headline_table.sh demo`. Rebuilt on ")
    assert "| sft | sft_model | 64 | 30.0 | 256 examples |" in document
    assert "| sft_rl | sft_model + rl_model | 64 + 8 | 55.0 | 256 examples + 4 tasks |" in document
    assert document.endswith(result.report)

    rankings_path = copy.asset_dir("evaluation", DATASET) / "rankings.parquet"
    rankings, saved = read_rankings(rankings_path)
    first = pl.col("system").eq("bprmf") & pl.col("in_llm_subset") & (pl.int_range(pl.len()) == 0).over("system")
    write_rankings(rankings.with_columns(pl.when(first).then(1.0 - pl.col("ndcg@10")).otherwise(pl.col("ndcg@10"))
                                         .alias("ndcg@10")), rankings_path, saved)
    assert main(["report", DATASET, "--root", str(tmp_path), "--check"]) == 1  # the table follows the rankings
    assert "differ from the saved report" in capsys.readouterr().err

    pl.read_parquet(rankings_path).write_parquet(rankings_path)  # rankings without the report settings
    assert main(["report", "--root", str(tmp_path)]) == 2
    assert "carries no report settings" in capsys.readouterr().err


def test_the_fusion_baseline_ranks_as_the_teacher_without_the_loop(evaluated):
    layout, result, _ = evaluated
    fusion, teacher = result.per_task["fusion"], result.per_task["teacher"]
    same = [a == b for a, b in zip(fusion["ranking"].to_list(), teacher["ranking"].to_list())]
    assert fusion["task_id"].to_list() == teacher["task_id"].to_list()
    assert sum(same) >= 0.8 * len(same)  # the same fused scores; only exact ties may break apart
    assert "fusion" in result.report and result.summaries["fusion"].height == 2


def test_an_llm_system_in_the_other_answer_mode_is_its_own_system(tmp_path):
    from recthinker_dagster.evaluation.llm_systems import agent_config_for, uses_tools

    settings = EvaluationSettings(systems=("teacher", "sft", "sft@logits", "zero_shot@logits"), answer_mode="generate")
    llm = llm_settings(settings)
    assert agent_config_for("sft", llm).answer_mode == "generate"
    config = agent_config_for("sft@logits", llm)
    assert (config.answer_mode, config.producer, config.max_turns) == ("logits", "sft@logits", llm["max_turns"])
    assert agent_config_for("zero_shot@logits", llm).max_turns == 1
    assert uses_tools("sft@logits") and not uses_tools("zero_shot@logits") and not uses_tools("reczero@generate")
    layout = ArtifactLayout(tmp_path)
    (layout.asset_dir("sft_model") / "adapter").mkdir(parents=True)
    assert policy_for("sft@logits", layout) == policy_for("sft", layout)  # one model serves both rows
    for bad, message in [(("random@logits",), "only LLM systems"), (("sft@beam",), "answer mode must be one of"),
                         (("sft_zero",), "unknown system 'sft_zero'"), (("sft", "sft"), "one system twice")]:
        with pytest.raises(ValueError, match=message):
            EvaluationSettings(systems=bad)


def test_the_report_treats_answer_mode_rows_as_agents(evaluated):
    from recthinker_dagster.evaluation.results import ReportSettings, build_report, read_rankings

    layout, _, _ = evaluated
    rankings, saved = read_rankings(layout.asset_dir("evaluation", DATASET) / "rankings.parquet")
    agent = rankings.filter(pl.col("system").eq("itemknn") & pl.col("in_llm_subset")).with_columns(
        system=pl.lit("sft@logits"))
    report = build_report(pl.concat([rankings, agent]), ReportSettings(DATASET, 10, 50, saved.seed))
    assert "sft@logits" not in report.summaries  # LLM systems run on the subset only
    assert "sft@logits" in report.subset_summaries
    assert {c.system for c in report.comparisons if c.label.startswith("best agent")} == {"sft@logits"}
