"""The training stages' helpers, without training a model: the filtering stage on real teacher
trajectories in a tiny artifact layout, its blocking check, the validation table and metrics,
the RL stage's lineage, metrics and curves, the recipe overrides and the progress callback."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import polars as pl
import pytest

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.quality import validate_sft_examples
from recthinker_dagster.settings import FilterSettings, RLSettings, SFTSettings, ValidationSettings
from recthinker_dagster.stages.filtering import (
    build_filtered_trajectories_stage,
    check_sft_examples,
    combined_counts,
    eval_tasks_of,
)
from recthinker_dagster.stages.result import Json, Markdown
from recthinker_dagster.stages.rl import (
    DatasetToolboxes,
    NoLearningSignal,
    learning_line,
    policy_lineage,
    refuse_no_op,
    rl_metrics,
    rl_recipe,
    rl_series,
)
from recthinker_dagster.stages.sft import sft_recipe
from recthinker_dagster.stages.validation import validation_document, validation_metrics, validation_table
from tests.support.trajectories import real_trajectories, real_world

DATASET = "ml-1m"


# -- filtering ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, prepared_base_model):
    """The filtering stage over every scripted train trajectory of ML-1M, one moved onto an eval user."""
    layout = ArtifactLayout(tmp_path_factory.mktemp("project"))
    eval_tasks = real_world().tasks.filter(pl.col("split") == "eval")
    records = [t.to_dict() for t in real_trajectories("train")]
    records[0] = {**records[0], "user_id": eval_tasks["user_id"][0]}  # must be dropped as an eval leak
    teacher = layout.asset_dir("teacher_trajectories", DATASET)
    teacher.mkdir(parents=True)
    (teacher / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    splits = layout.asset_dir("task_splits", DATASET)
    splits.mkdir(parents=True)
    eval_tasks.write_parquet(splits / "tasks_eval.parquet")
    os.symlink(prepared_base_model[0], layout.asset_dir("base_model"))  # its tokenizer counts the tokens
    messages = []
    result = build_filtered_trajectories_stage(FilterSettings(recipe="smoke", min_examples=2), layout, [DATASET],
                                               log=messages.append)
    return layout, records, result, messages


def test_filtering_stage_publishes_every_decision_and_the_kept_set(filtered):
    layout, records, result, messages = filtered
    folder = layout.asset_dir("filtered_trajectories")
    assert result.artifact.folder == folder
    decisions = pl.read_parquet(folder / "decisions.parquet")
    assert decisions.height == len(records) and set(decisions["dataset"]) == {DATASET}
    assert decisions.filter(pl.col("task_id") == records[0]["task_id"])["reasons"][0].startswith("eval_leak")
    kept = [json.loads(line) for line in (folder / "trajectories.jsonl").read_text().splitlines()]
    assert len(kept) == decisions["kept"].sum() == result.totals["kept"] > 0
    assert all(r["dataset"] == DATASET for r in kept) and len({r["task_id"] for r in kept}) == len(kept)
    counts = json.loads((folder / "counts.json").read_text())
    assert counts["recipe"] == "smoke" and counts["min_examples"] == 2 and counts["by_dataset"][DATASET]["total"] == len(records)
    assert messages and messages[0].startswith(f"{DATASET}: kept {len(kept)} of {len(records)}")


def test_filtering_stage_figures(filtered):
    _, records, result, _ = filtered
    artifact = result.artifact
    assert artifact.metrics["total"] == len(records) and artifact.metrics["dropped_eval_leak"] >= 1
    assert artifact.metrics["kept"] + artifact.metrics["dropped"] == len(records)
    assert artifact.params["recipe"] == "smoke" and artifact.params["datasets"] == DATASET
    assert "filter_top_k" in artifact.params
    table = artifact.metadata["dropped_by_reason"]
    assert isinstance(table, Markdown) and "| `eval_leak` |" in table and "| `low_rank` |" in table
    assert isinstance(artifact.metadata["by_group"], Json) and set(artifact.metadata["by_group"].value) == {"sparse", "dense"}
    by_dataset = {DATASET: {"kept": result.totals["kept"], "dropped": result.totals["dropped"]}}
    assert artifact.metadata["by_dataset"].value == by_dataset
    assert json.loads(artifact.texts["counts.json"])["total"] == result.totals
    assert artifact.cleanup == ()


def test_the_blocking_check_reads_the_published_set(filtered):
    layout, _, result, _ = filtered
    assert eval_tasks_of(layout, [DATASET]).columns == ["dataset", "user_id", "target_item_id"]
    report = check_sft_examples(layout, [DATASET])
    assert report.success, report.failures
    counts_file = layout.asset_dir("filtered_trajectories") / "counts.json"
    counts = json.loads(counts_file.read_text())
    counts_file.write_text(json.dumps({**counts, "min_examples": result.totals["kept"] + 1}))
    try:
        assert not check_sft_examples(layout, [DATASET]).success  # too few examples
    finally:
        counts_file.write_text(json.dumps(counts))


def test_combined_counts_sum_the_datasets():
    one = {"total": 3, "kept": 1, "dropped": 2, "by_reason": {"low_rank": 2, "too_long": 1},
           "by_primary_reason": {"low_rank": 2}, "by_group": {"sparse": {"kept": 1, "dropped": 2}},
           "by_producer": {"scripted": {"kept": 1, "dropped": 2}}}
    two = {"total": 2, "kept": 2, "dropped": 0, "by_reason": {}, "by_primary_reason": {},
           "by_group": {"dense": {"kept": 2, "dropped": 0}}, "by_producer": {"scripted": {"kept": 2, "dropped": 0}}}
    total = combined_counts({"a": one, "b": two})
    assert (total["total"], total["kept"], total["dropped"]) == (5, 3, 2)
    assert total["by_reason"] == {"low_rank": 2, "too_long": 1}
    assert total["by_group"] == {"sparse": {"kept": 1, "dropped": 2}, "dense": {"kept": 2, "dropped": 0}}
    assert total["by_producer"] == {"scripted": {"kept": 3, "dropped": 2}}


def _kept_frame(**overrides) -> pl.DataFrame:
    rows = {"dataset": ["d", "d"], "task_id": ["t1", "t2"], "split": ["train", "train"], "group": ["sparse", "dense"],
            "user_id": ["u1", "u2"], "target_item_id": ["i1", "i2"]}
    return pl.DataFrame({**rows, **overrides})


def test_sft_examples_suite_blocks_eval_leaks_missing_groups_and_small_sets():
    eval_tasks = pl.DataFrame({"dataset": ["d", "other"], "user_id": ["u9", "u1"], "target_item_id": ["i9", "i1"]})
    assert validate_sft_examples(_kept_frame(), eval_tasks, min_examples=2).success  # u1 is an eval user elsewhere only
    leak = validate_sft_examples(_kept_frame(user_id=["u9", "u2"]), eval_tasks, min_examples=2)
    assert not leak.success and any("user_key" in f for f in leak.failures)
    one_group = validate_sft_examples(_kept_frame(group=["sparse", "sparse"]), eval_tasks, min_examples=2)
    assert not one_group.success and any("group" in f for f in one_group.failures)
    small = validate_sft_examples(_kept_frame(), eval_tasks, min_examples=3)
    assert not small.success
    eval_split = validate_sft_examples(_kept_frame(split=["train", "eval"]), eval_tasks, min_examples=2)
    assert not eval_split.success and any("split" in f for f in eval_split.failures)


# -- validation -----------------------------------------------------------------------------------


def _report(ndcg: float) -> dict:
    summary = {"n_tasks": 2, "ndcg@1": ndcg, "ndcg@5": ndcg, "ndcg@10": ndcg, "valid_rate": 1.0,
               "answered_rate": 0.5, "valid_tool_call_rate": 0.75,
               "tool_calls_per_task": 2.0, "completion_tokens_per_task": 50.0, "mrr": ndcg}
    return {"producer": "p", "overall": summary, "by_dataset": {DATASET: summary}, "seconds": 1.0}


def test_validation_table_metrics_and_document():
    validation = {"base_model": _report(0.25), "sft_model": _report(0.5)}
    table = validation_table(validation).splitlines()
    assert table[0].startswith("| policy | dataset | tasks | ndcg@1 |") and len(table) == 2 + 4
    assert "| sft_model | ml-1m | 2 | 0.500 | 0.500 | 0.500 | 1.000 | 0.500 | 0.750 | 2.000 | 50.000 |" in table
    older = {"base_model": {**_report(0.25), "overall": {"n_tasks": 2, "ndcg@10": 0.25}}}
    assert "| base_model | overall | 2 | – | – | 0.250 |" in validation_table(older)  # absent, not zero
    assert "| base_model | overall | 2 |" in "\n".join(table)
    metrics = validation_metrics(validation)
    assert metrics["valid_sft_model_overall_ndcg@10"] == 0.5 and metrics["valid_base_model_ml-1m_valid_rate"] == 1.0
    assert not any("mrr" in name for name in metrics)  # only the table's columns
    settings = ValidationSettings(n_tasks=2, max_turns=2, max_tool_calls=2, max_new_tokens=96, batch_size=4)
    document = validation_document(settings, validation)
    assert list(document) == ["settings", "base_model", "sft_model"]
    assert document["settings"] == {"n_tasks": 2, "max_turns": 2, "max_tool_calls": 2, "max_new_tokens": 96,
                                    "batch_size": 4, "prompt_history_len": 10, "answer_mode": "generate",
                                    "conversation": "tools", "candidate_order": None}


def test_a_published_validation_is_reused_only_for_the_same_settings_and_tasks(tmp_path):
    from recthinker_dagster.stages.validation import saved_report
    from recthinker_dagster.training.validation import ValidationSuite

    settings = ValidationSettings(n_tasks=2, max_turns=2, max_tool_calls=2, max_new_tokens=96, batch_size=4)
    suites = [ValidationSuite(DATASET, [SimpleNamespace(task_id="t1"), SimpleNamespace(task_id="t2")], lambda t: None)]
    report = {**_report(0.5), "per_task": [{"task_id": t, "dataset": DATASET, "ndcg@10": 0.5} for t in ("t2", "t1")]}
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(validation_document(settings, {"sft_model": report})))
    assert saved_report(path, "sft_model", settings, suites) == report
    assert saved_report(path, "base_model", settings, suites) is None  # not scored there
    assert saved_report(path, "sft_model", replace(settings, max_new_tokens=160), suites) is None
    assert saved_report(path, "sft_model", replace(settings, prompt_history_len=20), suites) is None  # other prompts
    assert saved_report(path, "sft_model", replace(settings, candidate_order="1"), suites) is None  # other orders
    other = [ValidationSuite(DATASET, [SimpleNamespace(task_id="t1"), SimpleNamespace(task_id="t3")], lambda t: None)]
    assert saved_report(path, "sft_model", settings, other) is None
    assert saved_report(tmp_path / "missing.json", "sft_model", settings, suites) is None
    path.write_text("{not json")
    assert saved_report(path, "sft_model", settings, suites) is None


# -- SFT and RL -----------------------------------------------------------------------------------


def test_recipes_take_the_max_steps_override():
    assert sft_recipe(SFTSettings(recipe="smoke", max_steps=7)).max_steps == 7
    assert sft_recipe(SFTSettings(recipe="smoke")).max_steps == sft_recipe(SFTSettings(recipe="smoke", max_steps=None)).max_steps
    assert rl_recipe(RLSettings(recipe="smoke", max_steps=3)).max_steps == 3


def test_policy_lineage_resolves_recorded_paths(tmp_path):
    layout = ArtifactLayout(tmp_path)
    with pytest.raises(FileNotFoundError, match="materialize sft_model first"):
        policy_lineage(layout)
    folder = layout.asset_dir("sft_model")
    folder.mkdir(parents=True)
    (folder / "lineage.json").write_text(json.dumps({"base_model": "assets/base_model", "adapters": ["adapter"]}))
    lineage = policy_lineage(layout)
    assert lineage.base_model == tmp_path / "assets" / "base_model" and lineage.sft_adapter == folder / "adapter"


def test_dataset_toolboxes_route_each_task_to_its_dataset():
    toolboxes = DatasetToolboxes({"a": lambda task: ("a", task.task_id), "b": lambda task: ("b", task.task_id)})
    assert toolboxes(SimpleNamespace(dataset="b", task_id="t1")) == ("b", "t1")


def _published_train_tasks(tmp_path, monkeypatch) -> ArtifactLayout:
    """A project under ``tmp_path`` with the real-world fixture's train tasks published and its
    tool indexes served in place of the published ones."""
    import recthinker_dagster.stages.rl as rl_stage

    layout = ArtifactLayout(tmp_path)
    splits = layout.asset_dir("task_splits", DATASET)
    splits.mkdir(parents=True)
    real_world().tasks.filter(pl.col("split") == "train").write_parquet(splits / "tasks_train.parquet")
    monkeypatch.setattr(rl_stage, "load_tool_indexes", lambda layout, dataset: real_world().indexes)
    return layout


def test_the_unimitated_task_pool_leaves_out_every_task_sft_saw_a_solution_of(filtered, tmp_path, monkeypatch):
    import recthinker_dagster.stages.rl as rl_stage

    published, _, _, _ = filtered
    layout = _published_train_tasks(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match="materialize filtered_trajectories first"):
        rl_stage.rl_tasks(layout, [DATASET], 0, 10, task_pool="unimitated")
    decisions = pl.read_parquet(published.asset_dir("filtered_trajectories") / "decisions.parquet")
    layout.asset_dir("filtered_trajectories").mkdir(parents=True)
    decisions.write_parquet(layout.asset_dir("filtered_trajectories") / "decisions.parquet")

    every, _ = rl_stage.rl_tasks(layout, [DATASET], 0, 10)
    unimitated, toolboxes = rl_stage.rl_tasks(layout, [DATASET], 0, 10, task_pool="unimitated")
    imitated = set(decisions.filter(pl.col("kept"))["task_id"])
    assert imitated and unimitated  # the fixture kept some and dropped some (an eval leak at least)
    assert [t.task_id for t in unimitated] == [t.task_id for t in every if t.task_id not in imitated]
    assert toolboxes(unimitated[0]).task_id == unimitated[0].task_id
    two, _ = rl_stage.rl_tasks(layout, [DATASET], 2, 10, task_pool="unimitated")  # group-balanced, in the pool
    assert len(two) == 2 and not {t.task_id for t in two} & imitated
    with pytest.raises(ValueError, match="task_pool must be one of"):
        rl_stage.rl_tasks(layout, [DATASET], 2, 10, task_pool="seen")

    decisions.with_columns(kept=pl.lit(True)).write_parquet(layout.asset_dir("filtered_trajectories") / "decisions.parquet")
    with pytest.raises(ValueError, match="every train task of ml-1m has a kept teacher trajectory"):
        rl_stage.rl_tasks(layout, [DATASET], 2, 10, task_pool="unimitated")


def test_named_rl_tasks_are_looked_up_among_the_whole_pool_and_an_unknown_id_is_named(tmp_path, monkeypatch):
    """What ``scripts/grpo_signal.py --task-ids`` trains on: the named train tasks, in pool order."""
    import recthinker_dagster.stages.rl as rl_stage

    layout = _published_train_tasks(tmp_path, monkeypatch)
    every, _ = rl_stage.rl_tasks(layout, [DATASET], 0, 10)
    named = [every[-1].task_id, every[0].task_id]
    tasks, toolboxes = rl_stage.rl_tasks(layout, [DATASET], 0, 10, named)
    assert [t.task_id for t in tasks] == [every[0].task_id, every[-1].task_id]
    assert toolboxes(tasks[1]).task_id == every[-1].task_id
    with pytest.raises(ValueError, match=r"\['ml-1m/train/nosuch'\] are not among the train tasks of"):
        rl_stage.rl_tasks(layout, [DATASET], 0, 10, [every[0].task_id, "ml-1m/train/nosuch"])


def test_a_finished_runs_rollouts_are_rebuilt_with_its_recipe_and_tasks(tmp_path, monkeypatch, prepared_base_model):
    import recthinker_dagster.stages.rl as rl_stage
    from recthinker_dagster.training.resampling import GRPORun
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    layout = ArtifactLayout(tmp_path)
    splits = layout.asset_dir("task_splits", DATASET)
    splits.mkdir(parents=True)
    train = real_world().tasks.filter(pl.col("split") == "train")
    train.write_parquet(splits / "tasks_train.parquet")
    monkeypatch.setattr(rl_stage, "load_tool_indexes", lambda layout, dataset: real_world().indexes)
    layout.asset_dir("base_model").symlink_to(prepared_base_model[0])  # no start adapter: its tokenizer
    task_ids = sorted(train["task_id"].to_list())[:2]
    recipe = load_rl_recipe("smoke").with_overrides(temperature=1.3, max_turns=2, rollout_batch_size=3)
    run = GRPORun(recipe.to_dict(), "generate", task_ids, [], tmp_path / "adapter", 10)

    rollouts = rl_stage.run_rollouts(layout, run)
    assert rollouts.recipe == recipe
    assert sorted(task.task_id for task in rollouts.tasks) == task_ids
    assert rollouts.agent_config.max_turns == 2 and rollouts.precision in ("bf16", "fp32")
    rollout = rollouts.rollout(merged_rollouts=True)  # an option overrides the recipe's setting
    assert rollout.merged_rollouts and rollout.batch_size == 3 and len(rollout.dataset_rows()) == 2
    assert not rollouts.rollout().merged_rollouts and rollouts.rollout().seed == recipe.seed


def test_rl_recipes_check_their_task_pool():
    assert rl_recipe(RLSettings(recipe="demo")).task_pool == "train"
    assert rl_recipe(RLSettings(recipe="demo")).with_overrides(task_pool="unimitated").task_pool == "unimitated"
    assert rl_recipe(RLSettings(recipe="smoke")).task_pool == "train"
    with pytest.raises(ValueError, match="task_pool must be one of"):
        rl_recipe(RLSettings(recipe="demo")).with_overrides(task_pool="seen")


def test_rl_metrics_and_series():
    steps = [{"step": 1, "reward": 0.1, "rewards/ranking/mean": 0.1, "kl": 0.0},
             {"step": 2, "reward": 0.3, "rewards/ranking/mean": 0.2, "tools/call_frequency": 2.0, "note": "x"}]
    m = {"steps": steps, "train_seconds": 4.0, "seconds_per_step": 2.0, "global_step": 2, "final_reward": 0.3,
         "n_tasks": 2, "trainable_parameters": 10, "time_split_per_step": {"generation_s": 1.5, "tools_s": None}}
    metrics = rl_metrics(m, {"rl_model": _report(0.5)})
    assert metrics["global_step"] == 2 and metrics["time_generation_s"] == 1.5 and "time_tools_s" not in metrics
    assert metrics["last_reward"] == 0.3 and metrics["last_tools/call_frequency"] == 2.0 and "last_note" not in metrics
    assert metrics["valid_rl_model_overall_ndcg@10"] == 0.5
    series = rl_series(steps)
    assert series["reward"] == [0.1, 0.3] and series["rewards/ranking/mean"] == [0.1, 0.2]
    assert series["tools/call_frequency"] == [2.0] and "grad_norm" not in series  # empty curves are left out


def test_rl_metrics_carry_the_learning_summary_flat():
    learning = {"reward": {"steps_per_quarter": 1, "first_quarter": [0.5, None], "last_quarter": [0.8, None]},
                "mean_frac_reward_zero_std": 0.25,
                "tasks_first_and_last_visit": {"tasks": 2, "first": 0.5, "last": 0.7, "difference": 0.2, "se": 0.05}}
    m = {"steps": [], "time_split_per_step": {}, "learning": learning}
    metrics = rl_metrics(m, {})
    assert metrics["reward_first_quarter"] == 0.5 and metrics["reward_last_quarter"] == 0.8
    assert "reward_first_quarter_se" not in metrics  # a quarter of one step has no standard error
    assert metrics["mean_frac_reward_zero_std"] == 0.25
    assert metrics["task_visits_last_minus_first"] == 0.2 and metrics["task_visits_last_minus_first_se"] == 0.05
    assert "last minus first visit 0.2 +- 0.05" in learning_line(learning)
    assert learning_line(None) == "no steps logged"


def test_paired_difference_uses_the_tasks_both_scored():
    from recthinker_dagster.training.validation import paired_difference

    def report(values):
        return {"per_task": [{"task_id": f"t{k}", "ndcg@10": v} for k, v in enumerate(values)]}

    diff = paired_difference(report([1.0, 0.5, 0.5, 0.0]), report([0.5, 0.5, 0.0]))  # t3 only in one
    assert diff["n_tasks"] == 3 and diff["mean"] == pytest.approx(1 / 3, abs=1e-4)
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert paired_difference(report([1.0]), {"overall": {}}) == {"n_tasks": 0}  # an older report


def test_rl_refuses_a_run_without_learning_signal(tmp_path):
    flat = [{"step": k, "frac_reward_zero_std": 1.0, "rollout/valid_rate": 1.0} for k in (1, 2)]
    with pytest.raises(NoLearningSignal, match="frac_reward_zero_std = 1.*not published"):
        refuse_no_op(flat, tmp_path)
    invalid = [{"step": 1, "frac_reward_zero_std": 0.5, "rollout/valid_rate": 0.0}]
    with pytest.raises(NoLearningSignal, match="no rollout gave a valid answer"):
        refuse_no_op(invalid, tmp_path)
    with pytest.raises(NoLearningSignal, match="no step"):
        refuse_no_op([], tmp_path)
    refuse_no_op([*flat, {"step": 3, "frac_reward_zero_std": 0.5, "rollout/valid_rate": 0.25}], tmp_path)  # one step teaches


def test_progress_callback_logs_lines_with_its_key():
    from recthinker_dagster.training.callbacks import LogProgress

    lines = []
    callback = LogProgress(lines.append, "reward")
    state = SimpleNamespace(global_step=3, max_steps=5)
    callback.on_log(None, state, None, logs={"loss": 1.0})
    callback.on_log(None, state, None, logs={"reward": 0.25, "learning_rate": 1e-5})
    assert lines == ["step 3/5: reward 0.2500, lr 1.00e-05"]  # no pace before the run began
    timed = LogProgress(lines.append, "reward", extra=("frac_reward_zero_std",))
    timed.on_train_begin(None, SimpleNamespace(global_step=1), None)
    timed._started -= 20.0  # two steps took 20 s
    timed.on_log(None, state, None, logs={"reward": 0.5, "frac_reward_zero_std": 0.25, "learning_rate": 1e-5})
    assert lines[-1].startswith("step 3/5: reward 0.5000, frac_reward_zero_std 0.250, lr 1.00e-05, 10 s/step")
    assert lines[-1].endswith("ETA 0.3 min")  # two steps left at 10 s each


def test_learning_curve_table_json_and_plot(tmp_path):
    from recthinker_dagster.stages.sft_curve import CURVE_COLUMNS, LearningCurve

    def point(n, level):
        return {"n": n, "steps": n // 4, "train_seconds": 3.0 * n, "validate_seconds": 9.0,
                "overall": {c: level for c in CURVE_COLUMNS}, "by_dataset": {}}

    curve = LearningCurve([point(0, 0.1), point(32, 0.5), point(128, 0.9)], {"name": "demo"})
    paths = curve.write(tmp_path / "curve")
    assert json.loads(paths["json"].read_text())["points"][2]["overall"]["ndcg@10"] == 0.9
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    rows = curve.markdown().splitlines()
    assert rows[0].startswith("| examples | steps | train s | answered_rate") and len(rows) == 5
    assert rows[-1].startswith("| 128 | 32 | 384 | 0.900")
    assert curve.metrics()["curve_n32_ndcg@10"] == 0.5 and len(curve.metrics()) == 3 * len(CURVE_COLUMNS)


def test_the_sft_asset_takes_learning_curve_sizes():
    from recthinker_dagster.defs.config import SFTTrainingConfig

    assert SFTTrainingConfig(profile="smoke").settings().learning_curve_sizes == ()
    sizes = SFTTrainingConfig(profile="smoke", learning_curve_sizes=["0", "64", "all"]).settings().learning_curve_sizes
    assert tuple(sizes) == ("0", "64", "all")
