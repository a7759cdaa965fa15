"""GRPO's task screening: the start policy's sampled rollouts on a pool, and the choice of the
tasks whose rewards vary most (``training/task_screening.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recthinker_dagster.training.rl_recipes import load_rl_recipe
from recthinker_dagster.training.task_screening import budget_warning, choose_varied, screen_tasks
from tests.support.trajectories import agent_tasks, toolbox_factory


def _task(task_id, dataset):
    return SimpleNamespace(task_id=task_id, dataset=dataset)


def test_choose_varied_keeps_the_largest_spread_per_dataset_in_pool_order():
    pool = [_task("a1", "a"), _task("a2", "a"), _task("a3", "a"), _task("b1", "b"), _task("b2", "b")]
    rewards = {"a1": [1.0, 1.0], "a2": [0.0, 1.0], "a3": [0.5, 0.7], "b1": [0.3, 0.3], "b2": [0.3, 0.3]}
    selection = choose_varied(pool, rewards, 2)
    assert selection.chosen_ids() == ["a2", "a3", "b1", "b2"]  # a1 solved (flat) is dropped; b: a tie, both kept
    rows = {row["task_id"]: row for row in selection.report}
    assert rows["a2"] == {"task_id": "a2", "dataset": "a", "rewards": [0.0, 1.0], "mean": 0.5, "std": 0.5, "chosen": True}
    assert not rows["a1"]["chosen"] and rows["a1"]["std"] == 0.0
    assert choose_varied(pool, rewards, 1).chosen_ids() == ["a2", "b1"]  # a tie goes to the earlier task
    assert len(choose_varied(pool, rewards, 0).tasks) == 5  # 0: every task


def test_screening_recipe_fields_are_checked():
    demo = load_rl_recipe("demo")
    with pytest.raises(ValueError, match="at most screen_pool"):
        demo.with_overrides(screen_pool=1, n_train_tasks=2)
    with pytest.raises(ValueError, match="screen_rollouts"):
        demo.with_overrides(screen_pool=4, screen_rollouts=1)
    assert load_rl_recipe("smoke").screen_pool == 0  # the smoke run takes its first tasks as they come


def test_screening_samples_every_pool_task_and_chooses_per_dataset(answering_base_model):
    """The bigram model answers at once with sampled label orders, so rewards vary within a task."""
    pool = agent_tasks("train", 4)
    recipe = load_rl_recipe("smoke").with_overrides(screen_pool=4, n_train_tasks=2, screen_rollouts=3,
                                                    max_turns=1, max_new_tokens=48)
    lines: list[str] = []
    selection = screen_tasks(pool, toolbox_factory, answering_base_model, [], recipe, log=lines.append)
    assert [row["task_id"] for row in selection.report] == [t.task_id for t in pool]
    assert all(len(row["rewards"]) == 3 for row in selection.report)
    assert len(selection.tasks) == 2 and {t.dataset for t in selection.tasks} == {pool[0].dataset}
    spreads = sorted((row["std"] for row in selection.report), reverse=True)
    assert min(row["std"] for row in selection.report if row["chosen"]) >= spreads[1]
    assert spreads[0] > 0  # sampled rollouts of one task differ
    assert any("chose" in line for line in lines)
    assert selection.own_answer_share == 1.0  # it answers at once: no budget forced an answer
    assert not any("WARNING" in line for line in lines)
    again = screen_tasks(pool, toolbox_factory, answering_base_model, [], recipe, log=lines.append)
    assert again.report == selection.report  # seeded: the same rollouts, the same choice


def test_a_budget_that_forces_most_answers_is_named():
    recipe = load_rl_recipe("demo").with_overrides(max_turns=3, max_tool_calls=2)
    warning = budget_warning(0.05, recipe)
    assert warning is not None and "5%" in warning and "max_tool_calls 2" in warning and "max_turns 3" in warning
    assert budget_warning(0.5, recipe) is None and budget_warning(1.0, recipe) is None


def test_the_rl_stage_keeps_its_screening_for_a_resumed_run(tmp_path, answering_base_model, monkeypatch):
    import recthinker_dagster.training.task_screening as task_screening
    from recthinker_dagster.stages.rl import PolicyLineage, screened_tasks

    pool = agent_tasks("train", 3)
    recipe = load_rl_recipe("smoke").with_overrides(screen_pool=3, n_train_tasks=1, screen_rollouts=2,
                                                    max_turns=1, max_new_tokens=48)
    policy = PolicyLineage(answering_base_model, None)
    first = screened_tasks(pool, toolbox_factory, policy, recipe, "generate", tmp_path, lambda line: None)
    assert len(first["chosen"]) == 1 and len(first["tasks"]) == 3 and (tmp_path / "screening.json").is_file()
    assert first["own_answer_share"] == 1.0

    def no_second_screening(*args, **kwargs):
        raise AssertionError("a resumed run screened again")

    monkeypatch.setattr(task_screening, "screen_tasks", no_second_screening)
    assert screened_tasks(pool, toolbox_factory, policy, recipe, "generate", tmp_path, lambda line: None) == first
    with pytest.raises(AssertionError, match="screened again"):  # a fresh run (resume off) screens anew
        screened_tasks(pool, toolbox_factory, policy, recipe, "generate", tmp_path, lambda line: None, resume=False)
