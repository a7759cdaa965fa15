"""Resampling a start and a trained policy on the same tasks and step seeds (training/resampling.py)."""

from __future__ import annotations

import json

import pytest
import torch

from recthinker_dagster.agent import AgentConfig, SamplingParams
from recthinker_dagster.training.grpo import ToolRollout
from recthinker_dagster.training.resampling import (
    FIGURES,
    compare_resampled,
    merge_resamplings,
    read_grpo_run,
    resampled_groups,
)
from recthinker_dagster.training.rewards import RolloutOutcome, weighted_reward
from recthinker_dagster.training.rl_recipes import load_rl_recipe
from tests.support.trajectories import ScriptedInvestigator, agent_tasks, toolbox_factory


@pytest.fixture(scope="module")
def tokenizer(prepared_base_model):
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template

    return ensure_tool_chat_template(AutoTokenizer.from_pretrained(prepared_base_model[0]))


def test_each_task_and_step_is_one_group_of_the_recipes_rollouts_with_the_recipes_reward(tokenizer):
    recipe = load_rl_recipe("smoke")  # groups of 4
    tasks = agent_tasks("train", 2)
    config = AgentConfig(max_turns=3, max_tool_calls=4, sampling=SamplingParams(max_new_tokens=64))
    rollout = ToolRollout(tasks, toolbox_factory, config, tokenizer,
                          backend_factory=lambda model, tok: ScriptedInvestigator())
    groups = resampled_groups(torch.nn.Linear(1, 1), rollout, recipe, steps=[100, 101])
    assert [(g["step"], g["task_id"]) for g in groups] == [(s, t.task_id) for s in (100, 101) for t in tasks]
    assert all(len(g[name]) == 4 for g in groups for name in FIGURES)
    last = [g for g in groups if g["step"] == 101]
    for group in last:  # the reward is the recipe's weighted reward of each rollout
        trajectories = [t for t in rollout.last_trajectories if t.task_id == group["task_id"]]
        expected = [weighted_reward(RolloutOutcome.from_trajectory(t, recipe.max_tool_calls), recipe.reward_weights,
                                    recipe.reward_params) for t in trajectories]
        assert group["reward"] == pytest.approx(expected)
        assert group["ndcg@10"] == pytest.approx([t.metrics["ndcg@10"] for t in trajectories])
        assert group["tool_calls"] == [2.0] * 4 and group["failed_calls"] == [0.0] * 4


def _groups(rewards_by_group):
    return [{"step": step, "task_id": task, "reward": rewards, "ndcg@10": rewards, "answered": [1.0] * len(rewards),
             "failed_calls": [0.0] * len(rewards), "tool_calls": [2.0] * len(rewards)}
            for (step, task), rewards in rewards_by_group.items()]


def test_the_comparison_pairs_groups_by_step_and_task():
    start = _groups({(1, "a"): [0.2, 0.4], (1, "b"): [1.0, 1.0], (2, "a"): [0.0, 0.2], (2, "b"): [0.8, 1.0]})
    trained = _groups({(1, "a"): [0.4, 0.6], (1, "b"): [1.0, 1.0], (2, "a"): [0.2, 0.2], (2, "b"): [0.9, 1.0]})
    comparison = compare_resampled(start, trained)
    assert comparison["trained_minus_start"]["groups"] == 4
    assert comparison["trained_minus_start"]["mean"] == pytest.approx((0.2 + 0.0 + 0.1 + 0.05) / 4)
    low, high = comparison["trained_minus_start"]["ci95"]
    assert 0.0 <= low <= comparison["trained_minus_start"]["mean"] <= high <= 0.2
    assert comparison["start"]["reward"] == pytest.approx(0.575) and comparison["start"]["rollouts"] == 8
    assert comparison["start"]["reward_se"] > 0
    same = compare_resampled(start, start)["trained_minus_start"]
    assert same == {"groups": 4, "mean": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="share no"):
        compare_resampled(start, _groups({(3, "a"): [1.0]}))


def _write_json(path, document):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def test_a_run_is_read_from_a_grpo_signal_folder_or_a_published_rl_model(tmp_path):
    recipe = load_rl_recipe("smoke").to_dict()
    visits = [{"task_id": "ml-1m/train/7", "step": 1}, {"task_id": "amazon-cds/train/3", "step": 1},
              {"task_id": "ml-1m/train/7", "step": 2}]
    signal = tmp_path / "signal"
    _write_json(signal / "grpo_signal.json", {"recipe": recipe, "answer_mode": "generate", "task_visits": visits,
                                              "sft_adapter": str(tmp_path / "sft"), "prompt_history_len": 6})
    (signal / "run" / "adapter").mkdir(parents=True)
    run = read_grpo_run(signal, tmp_path)
    assert run.task_ids == ["amazon-cds/train/3", "ml-1m/train/7"]
    assert run.start_adapters == [tmp_path / "sft"] and run.trained_adapter == signal / "run" / "adapter"
    assert (run.recipe, run.answer_mode, run.prompt_history_len) == (recipe, "generate", 6)

    asset = tmp_path / "assets" / "rl_model"
    _write_json(asset / "metrics.json", {"recipe_config": recipe, "answer_mode": "logits", "task_visits": visits})
    _write_json(asset / "lineage.json", {"adapters": ["assets/sft_model/adapter", "assets/rl_model/adapter"]})
    _write_json(asset / "validation.json", {"settings": {"prompt_history_len": 8}})
    with pytest.raises(FileNotFoundError, match="trained adapter"):
        read_grpo_run(asset, tmp_path)
    (asset / "adapter").mkdir()
    run = read_grpo_run(asset, tmp_path)
    assert run.start_adapters == [tmp_path / "assets" / "sft_model" / "adapter"]
    assert run.trained_adapter == asset / "adapter"
    assert (run.recipe, run.answer_mode, run.prompt_history_len) == (recipe, "logits", 8)
    assert run.task_ids == ["amazon-cds/train/3", "ml-1m/train/7"]


def test_a_folder_that_is_no_run_says_what_it_lacks(tmp_path):
    _write_json(tmp_path / "metrics.json", {})
    with pytest.raises(FileNotFoundError, match="lineage.json, validation.json"):
        read_grpo_run(tmp_path, tmp_path)


def test_resamplings_of_one_run_at_other_steps_pool_into_one_comparison():
    def saved(steps, start, trained, run="runs/a", tasks=("a", "b")):
        return {"run": run, "steps": steps, "tasks": list(tasks),
                "groups": {"start": _groups(start), "trained": _groups(trained)}}

    first = saved([1], {(1, "a"): [0.2, 0.4], (1, "b"): [1.0, 1.0]}, {(1, "a"): [0.4, 0.6], (1, "b"): [1.0, 1.0]})
    second = saved([2], {(2, "a"): [0.0, 0.2], (2, "b"): [0.8, 1.0]}, {(2, "a"): [0.2, 0.2], (2, "b"): [0.9, 1.0]})
    merged = merge_resamplings([first, second])
    pooled = compare_resampled(first["groups"]["start"] + second["groups"]["start"],
                               first["groups"]["trained"] + second["groups"]["trained"])
    assert merged["steps"] == [1, 2] and merged["trained_minus_start"] == pooled["trained_minus_start"]
    assert merged["trained_minus_start"]["groups"] == 4
    assert merge_resamplings([merged])["trained_minus_start"] == pooled["trained_minus_start"]  # merges compose
    with pytest.raises(ValueError, match=r"repeats step seeds \[1\]"):
        merge_resamplings([first, first])
    with pytest.raises(ValueError, match="in its run"):
        merge_resamplings([first, {**second, "run": "runs/b"}])
    with pytest.raises(ValueError, match="in its tasks"):
        merge_resamplings([first, {**second, "tasks": ["c"]}])
    with pytest.raises(ValueError, match="lacks"):
        merge_resamplings([{"run": "runs/a"}])
