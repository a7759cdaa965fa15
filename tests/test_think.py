"""Think before recommend (RecZero, RecOne): the SFT set of the thinking teacher, then the whole
branch on a small synthetic project with a tiny random model (slow): the thinking teacher's
trajectories, RecOne's SFT cold start, one GRPO step each of RecZero and RecOne, and both as
systems of the evaluation."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.settings import EvaluationSettings, TeacherSettings, ThinkSettings, ValidationSettings
from recthinker_dagster.stages.think import (
    RECONE,
    RECONE_SFT,
    RECZERO,
    build_recone_sft_stage,
    build_think_rl_stage,
    build_think_trajectories_stage,
    think_sft_records,
)
from tests.test_stages_evaluation import DATASET, publish_inputs

REASONING = "<user>likes horror</user>\n<candidates>G is a slasher</candidates>\n<match>G fits</match>\n"


def _record(task: str, ndcg: float, *, target_first: bool = True, sections: bool = True, finish: str = "answer") -> dict:
    ranking = ["t", "x", "y", "z"] if target_first else ["x", "y", "z", "t"]
    reply = (REASONING if sections else "no reasoning\n") + "<answer>A, B, C, D</answer>"
    return {"task_id": task, "target_item_id": "t", "final_ranking": ranking, "valid": True, "finish": finish,
            "metrics": {"ndcg@10": ndcg}, "messages": [{"role": "system", "content": "s"},
                                                       {"role": "user", "content": "u"},
                                                       {"role": "assistant", "content": reply}]}


def test_the_recone_sft_set_keeps_the_best_usable_sample_per_task(tmp_path):
    layout = ArtifactLayout(tmp_path)
    folder = layout.asset_dir("think_trajectories", "ml-1m")
    folder.mkdir(parents=True)
    records = [_record("a", 0.6), _record("a", 0.9), _record("a", 1.0, sections=False),  # best usable: 0.9
               _record("b", 0.4, target_first=False),  # target outside the top 3: dropped
               _record("c", 0.7, finish="forced_head"),  # not its own answer: dropped
               _record("d", 0.5)]
    (folder / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kept, version = think_sft_records(layout, ["ml-1m"], keep_top_k=3)
    assert sorted((r["task_id"], r["metrics"]["ndcg@10"]) for r in kept) == [("a", 0.9), ("d", 0.5)]
    assert all(r["dataset"] == "ml-1m" for r in kept)
    assert think_sft_records(layout, ["ml-1m"], keep_top_k=4)[1] != version  # the setting is part of the version
    with pytest.raises(FileNotFoundError, match="materialize amazon_cds/think_trajectories first"):
        think_sft_records(layout, ["ml-1m", "amazon-cds"], keep_top_k=3)


TINY_RL = """name: think-test
version: 1
conversation: think
max_turns: 1
max_tool_calls: 0
max_steps: 1
learning_rate: 1.0e-4
num_generations: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 4   # four groups of two: an all-equal step is unlikely
temperature: 1.5
max_new_tokens: 48
n_train_tasks: 4               # one step takes four tasks
reward_weights: {ranking: 1.0, reasoning: 0.1}
save_steps: 1
"""


@pytest.fixture(scope="module")
def think_branch(tmp_path_factory, tiny_base_model):
    root = tmp_path_factory.mktemp("think")
    layout = ArtifactLayout(root)
    publish_inputs(layout)
    os.symlink(tiny_base_model, layout.asset_dir("base_model"))
    (root / "rl_tiny.yaml").write_text(TINY_RL)
    settings = ThinkSettings(samples_per_task=2, keep_top_k=10, sft_recipe="smoke", sft_max_steps=1,
                             reczero_recipe=str(root / "rl_tiny.yaml"), recone_recipe=str(root / "rl_tiny.yaml"),
                             validation=ValidationSettings(n_tasks=2, max_new_tokens=48, batch_size=4))
    log: list[str] = []
    trajectories = build_think_trajectories_stage(settings, TeacherSettings(batch_size=16), layout, DATASET, log.append)
    sft = build_recone_sft_stage(settings, layout, [DATASET], log.append)
    zero = build_think_rl_stage(settings, layout, [DATASET], RECZERO, log.append)
    one = build_think_rl_stage(settings, layout, [DATASET], RECONE, log.append)
    return layout, trajectories, sft, zero, one


@pytest.mark.slow
def test_the_think_branch_trains_recone_and_reczero_without_tools(think_branch):
    layout, trajectories, sft, zero, one = think_branch
    records = [json.loads(line) for line in
               (layout.asset_dir("think_trajectories", DATASET) / "trajectories.jsonl").read_text().splitlines()]
    assert records and {r["producer"] for r in records} == {"scripted-thinker-v1"}
    assert all(r["n_tool_calls"] == 0 and r["tools"] == [] for r in records)
    assert set(sft.validation) == {RECONE_SFT}  # RecZero's validation scores the base model
    assert json.loads((layout.asset_dir(RECONE_SFT) / "validation.json").read_text())["settings"]["conversation"] == "think"
    for result, start in ((zero, "base_model"), (one, RECONE_SFT)):
        assert result.global_step == 1 and result.metrics["steps"][-1]["tools/call_frequency"] == 0.0
        assert set(result.validation) == {start, result.artifact.folder.name}
    assert json.loads((layout.asset_dir(RECZERO) / "lineage.json").read_text())["adapters"] == ["assets/reczero_model/adapter"]
    assert json.loads((layout.asset_dir(RECONE) / "lineage.json").read_text())["adapters"] == [
        "assets/recone_sft_model/adapter", "assets/recone_model/adapter"]


@pytest.mark.slow
def test_the_evaluation_scores_reczero_and_recone_beside_the_classical_systems(think_branch):
    from recthinker_dagster.stages.evaluation import run_evaluation_stage

    layout = think_branch[0]
    settings = EvaluationSettings(systems=("popularity", "reczero", "recone"), n_bootstrap=20, llm_tasks=2,
                                  llm_max_new_tokens=48)
    result = run_evaluation_stage(settings, layout, DATASET, profile="smoke", log=lambda line: None)
    rankings = pl.read_parquet(layout.asset_dir("evaluation", DATASET) / "rankings.parquet")
    for system in ("reczero", "recone"):
        rows = rankings.filter(pl.col("system") == system)
        assert rows.height == 2 and rows["in_llm_subset"].all() and rows["n_tool_calls"].sum() == 0
        assert rows["valid"].all()  # constrained answers, or the label head
    assert "| sparse | best agent vs strongest baseline |" in result.report
