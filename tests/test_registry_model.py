"""The agent as a registered MLflow model: log, register, promote, load by alias, rank.

Real artifacts throughout (``tests/support/registry.py``): a tiny random base model with
SmolLM2's tokenizer (``tests/support/tiny_models.py``), tiny seeded LoRA adapters, tool indexes
built from small real (ML-1M) and synthetic data, and a temporary SQLite tracking store and
registry. The untrained model never calls a tool within 32 new tokens, so the loop ends in a
fallback or a (completed) partial answer: the ranking is always a permutation of the candidates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest

from recthinker_dagster.agent.backends.chat_template import compact_template
from recthinker_dagster.serving.promotion import decide_promotion
from recthinker_dagster.serving.pyfunc import (
    INDEX_ASSETS,
    InvalidAgentRequest,
    MissingModelArtifact,
    log_agent_model,
    resolve_reference,
)
from recthinker_dagster.serving.registry import (
    apply_promotion,
    champion_metrics,
    champion_version,
)
from tests.support.registry import SERVING_CONFIG, log_version, new_registry, serving_world

NAME = "recthinker-agent"
BASE = {"ndcg@10": 0.20, "hr@10": 0.40}
FIRST = {"ndcg@10": 0.30, "hr@10": 0.50}
WORSE = {"ndcg@10": 0.25, "hr@10": 0.45}
BETTER = {"ndcg@10": 0.36, "hr@10": 0.58}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tiny_base_model, tmp_path_factory):
    world = serving_world(tiny_base_model)
    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("registry")
    uri = new_registry(root)
    yield SimpleNamespace(world=world, uri=uri, root=root, client=mlflow.MlflowClient(uri), versions={})
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def champion(registry):
    """The champion loaded by alias (promotes a first version when none is there yet)."""
    if champion_version(registry.client, NAME) is None:
        version = log_version(registry.world)
        decision = decide_promotion(FIRST, None, BASE)
        apply_promotion(registry.client, NAME, str(version.version), decision, FIRST)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def _promote(registry, version, metrics, margin=0.0):
    current = champion_version(registry.client, NAME)
    decision = decide_promotion(metrics, champion_metrics(registry.client, NAME), BASE, margin=margin,
                                champion_version=str(current.version) if current else None)
    return decision, apply_promotion(registry.client, NAME, version, decision, metrics)


def test_index_asset_names_are_the_pipelines():
    from recthinker_dagster import artifacts

    assert INDEX_ASSETS is artifacts.INDEX_ASSETS  # one mapping: the model finds the folders the pipeline wrote


def test_adapters_are_merged_in_order(registry):
    """Merged weight = base + each adapter's scaled B @ A; the tokenizer comes from the SFT adapter."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from recthinker_dagster.serving.agent import load_merged_model

    world = registry.world
    merged, tokenizer = load_merged_model(world.base_model, world.adapters, dtype="float32", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32)
    key = "model.layers.0.self_attn.q_proj"
    expected = base.get_submodule(key).weight.detach().clone()
    for adapter in world.adapters:
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        a, b = (weights[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
        expected += 2.0 * (b @ a)  # lora_alpha / r = 4 / 2
    merged_weight = merged.get_submodule(key).weight.detach()
    assert not torch.allclose(merged_weight, base.get_submodule(key).weight, atol=1e-4)
    torch.testing.assert_close(merged_weight, expected, atol=1e-5, rtol=1e-5)
    assert tokenizer.chat_template == compact_template()  # the SFT adapter's tool template


def test_recthinker_merge_writes_the_policy_as_one_model_folder(registry, tmp_path, capsys):
    """What ``vllm serve`` takes for a stacked policy (SFT + RL): the merged weights and the tool template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.cli import main
    from recthinker_dagster.serving.agent import load_merged_model

    world = registry.world
    out = tmp_path / "merged"
    assert main(["merge", str(out), str(world.base_model), *map(str, world.adapters), "--dtype", "float32"]) == 0
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged, _ = load_merged_model(world.base_model, world.adapters, dtype="float32", device="cpu")
    key = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(written.get_submodule(key).weight, merged.get_submodule(key).weight)
    assert not any("lora" in name for name, _ in written.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == compact_template()
    assert main(["merge", str(out), str(world.base_model)]) == 2  # never over an existing model
    assert main(["merge", str(tmp_path / "other"), str(tmp_path / "no-base")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_log_register_and_promote(registry):
    client, world = registry.client, registry.world
    first = log_version(world, metrics=FIRST, tags={"asset": "registered_model"})
    assert str(first.version) == "1" and first.tags["base_model"] == "referenced"
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.signature.inputs.input_names() == ["dataset", "user_id", "candidate_item_ids", "history_item_ids"]
    assert info.signature.outputs.input_names() == ["ranking", "valid", "n_tool_calls", "trajectory"]
    assert info.saved_input_example_info is not None
    run = client.get_run(first.run_id)
    assert run.data.metrics["ndcg_at_10"] == 0.30 and run.data.tags["asset"] == "registered_model"
    spec = mlflow.artifacts.load_dict(f"runs:/{first.run_id}/agent_config.json")
    assert spec["config"]["max_new_tokens"] == SERVING_CONFIG["max_new_tokens"] and spec["adapters"] == ["adapter_0"]
    assert spec["base_model"]["artifact"] is None and spec["base_model"]["path"] == str(world.base_model.resolve())
    assert set(spec["tool_indexes"]) == set(world.tool_indexes)

    decision, applied = _promote(registry, "1", FIRST)
    assert decision.promote and applied == {"alias": "champion", "version": "1", "previous_champion": None}
    assert str(champion_version(client, NAME).version) == "1"
    assert champion_metrics(client, NAME) == FIRST

    # a worse model becomes the challenger; the champion stays
    second = log_version(world)
    decision, applied = _promote(registry, str(second.version), WORSE, margin=0.01)
    assert not decision.promote and applied["alias"] == "challenger"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    assert str(champion_version(client, NAME).version) == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion_decision"] == "rejected"
    assert "ndcg@10 0.250 <= champion v1 0.300 + margin 0.010" in tags["promotion_reasons"]
    assert tags["compared_champion_version"] == "1" and tags["metric.ndcg_at_10"] == "0.25"
    assert json.loads(tags["promotion_metrics"]) == WORSE

    # a better one (SFT + RL adapters) takes over; the old champion keeps its version
    third = log_version(world, adapters=world.adapters)
    decision, applied = _promote(registry, str(third.version), BETTER, margin=0.01)
    assert decision.promote and applied == {"alias": "champion", "version": "3", "previous_champion": "1"}
    assert str(champion_version(client, NAME).version) == "3"
    assert client.get_model_version(NAME, "1").tags["replaced_by"] == "3"
    assert client.get_model_version(NAME, "3").tags["promotion_decision"] == "promoted"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    assert champion_metrics(client, NAME) == BETTER
    assert client.get_model_version(NAME, "3").tags["n_adapters"] == "2"


def test_champion_ranks_a_real_request(registry, champion):
    world = registry.world
    task = world.eval_task(0)
    out = champion.predict(pd.DataFrame([world.request(5)]))
    assert list(out.columns) == ["ranking", "valid", "n_tool_calls", "trajectory"] and len(out) == 1
    row = out.iloc[0]
    assert sorted(row["ranking"]) == sorted(task["candidate_item_ids"][:5])  # a permutation
    assert row["valid"] in (True, False)
    assert row["n_tool_calls"] == 0  # the untrained model never calls a tool in 32 tokens
    messages = json.loads(row["trajectory"])
    assert [m["role"] for m in messages[:2]] == ["system", "user"] and messages[-1]["role"] == "assistant"
    # without a history the user-profile index gives it: for an eval user, the task's history
    assert f" {task['history_item_ids'][-1]}: " in messages[1]["content"]


def test_requests_become_tasks_without_a_target(registry, champion):
    """Histories from the index or as given (lists or JSON strings); the target is empty."""
    agent = champion.unwrap_python_model().agent
    world = registry.world
    task = world.eval_task(0)
    explicit = world.request(4, candidate_item_ids=json.dumps(task["candidate_item_ids"][:4]),
                             history_item_ids=json.dumps(task["history_item_ids"][:3]))
    plain, given = agent.task_rows([world.request(5), explicit])
    assert plain["history_item_ids"] == task["history_item_ids"] and plain["target_item_id"] == ""
    assert given["history_item_ids"] == task["history_item_ids"][:3]
    assert given["candidate_item_ids"] == task["candidate_item_ids"][:4]
    assert plain["task_id"] != given["task_id"] and given["split"] == "serving"
    for other in sorted(set(world.tool_indexes) - {world.dataset}):  # the other dataset(s) of the model
        row = world.tasks[other].row(0, named=True)
        [served] = agent.task_rows([{"dataset": other, "user_id": row["user_id"],
                                     "candidate_item_ids": row["candidate_item_ids"][:3], "history_item_ids": None}])
        assert served["dataset"] == other and served["history_item_ids"] == row["history_item_ids"]


@pytest.mark.parametrize("overrides, message", [
    ({"user_id": "no-such-user"}, "unknown user 'no-such-user'"),
    ({"candidate_item_ids": ["no-such-item", "also-missing"]}, "unknown candidate item ids 'no-such-item', 'also-missing'"),
    ({"history_item_ids": ["no-such-item"]}, "unknown history item ids 'no-such-item'"),
    ({"dataset": "netflix"}, r"unknown dataset 'netflix'; this agent serves \["),
    ("one", r"1 candidate\(s\) given .*rank at least 2"),
    ("duplicates", "duplicate candidate item ids"),
    ({"candidate_item_ids": "1193, 661"}, "must be a list of item ids or a JSON list string"),
])
def test_bad_requests_are_clear_errors(registry, champion, overrides, message):
    request = registry.world.request(5)
    if overrides == "one":
        request["candidate_item_ids"] = request["candidate_item_ids"][:1]
    elif overrides == "duplicates":
        request["candidate_item_ids"] = request["candidate_item_ids"][:2] * 2
    else:
        request.update(overrides)
    with pytest.raises(ValueError, match=message) as caught:
        champion.predict(pd.DataFrame([registry.world.request(3), request]))
    assert isinstance(caught.value, InvalidAgentRequest) and "request 1: " in str(caught.value)


def test_a_missing_column_is_a_clear_error(champion):
    with pytest.raises(Exception, match="candidate_item_ids"):
        champion.predict(pd.DataFrame([{"dataset": "ml-1m", "user_id": "1"}]))


def test_a_missing_referenced_folder_names_the_artifact_and_the_restore_command(registry, tmp_path, monkeypatch):
    monkeypatch.delenv("RECTHINKER_HOME", raising=False)  # no fallback into a real project
    world = registry.world
    dataset = world.dataset
    moved = tmp_path / "moved" / "assets" / "user_profiles" / dataset
    shutil.copytree(world.tool_indexes[dataset]["profiles"], moved)
    indexes = {d: dict(f) for d, f in world.tool_indexes.items()}
    indexes[dataset]["profiles"] = {"path": moved, "md5": "0123abcd.dir"}
    version = log_agent_model(world.base_model, world.adapters[:1], indexes, config=SERVING_CONFIG,
                              registered_model_name="recthinker-agent-moved", experiment_name="serving-tests")
    shutil.rmtree(moved)
    with pytest.raises(MissingModelArtifact) as caught:
        mlflow.pyfunc.load_model(f"models:/recthinker-agent-moved/{version.version}")
    text = str(caught.value)
    assert f"tool index profiles of {dataset} (user_profiles/{dataset})" in text
    assert str(moved) in text and "(DVC md5 0123abcd.dir)" in text
    assert f"`recthinker restore user_profiles/{dataset} 0123abcd.dir`" in text
    assert "include_tool_indexes=True" in text

    # the folder is back, but DVC says it holds another version than the one logged
    shutil.copytree(world.tool_indexes[dataset]["profiles"], moved)
    moved.with_name(dataset + ".dvc").write_text(f"outs:\n- md5: 9999.dir\n  path: {dataset}\n")
    with pytest.raises(MissingModelArtifact, match=r"is DVC version 9999\.dir, but the model was logged with 0123abcd\.dir"):
        mlflow.pyfunc.load_model(f"models:/recthinker-agent-moved/{version.version}")


def test_a_moved_project_is_found_through_recthinker_home(tmp_path, monkeypatch):
    ref = {"asset": "user_profiles", "dataset": "ml-1m", "path": str(tmp_path / "gone"), "md5": "ab.dir"}
    monkeypatch.delenv("RECTHINKER_HOME", raising=False)
    home = tmp_path / "project"
    (home / "assets" / "user_profiles" / "ml-1m").mkdir(parents=True)
    with pytest.raises(MissingModelArtifact, match="recthinker restore user_profiles/ml-1m ab.dir"):
        resolve_reference(ref, "profiles", "include_tool_indexes")
    monkeypatch.setenv("RECTHINKER_HOME", str(home))
    assert resolve_reference(ref, "profiles", "include_tool_indexes") == home / "assets" / "user_profiles" / "ml-1m"
    base = {"asset": "base_model", "dataset": None, "path": str(tmp_path / "gone"), "md5": ""}
    expected = r"expected the folder .*gone or .*assets/base_model\. .*rematerialize base_model"
    with pytest.raises(MissingModelArtifact, match=expected):
        resolve_reference(base, "the base model", "include_base_model")


def test_a_packaged_model_needs_none_of_the_original_folders(registry, tmp_path):
    world = registry.world
    base = shutil.copytree(world.base_model, tmp_path / "base_model")
    indexes = {d: {n: shutil.copytree(f, tmp_path / d / n) for n, f in folders.items()}
               for d, folders in world.tool_indexes.items()}
    version = log_agent_model(base, world.adapters, indexes, config=SERVING_CONFIG, include_base_model=True,
                              include_tool_indexes=True, registered_model_name="recthinker-agent-packaged",
                              experiment_name="serving-tests")
    assert version.tags["base_model"] == "packaged" and version.tags["tool_indexes"] == "packaged"
    shutil.rmtree(base)
    for dataset in indexes:
        shutil.rmtree(tmp_path / dataset)
    model = mlflow.pyfunc.load_model(f"models:/recthinker-agent-packaged/{version.version}")
    agent = model.unwrap_python_model().agent
    assert agent.datasets == sorted(world.tool_indexes)


def test_the_model_ships_its_code_and_minimal_requirements(registry):
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(registry.root / "download")))
    assert (local / "code" / "recthinker_dagster" / "serving" / "pyfunc.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().split()
    names = {line.split("==")[0] for line in requirements}
    assert {"mlflow", "torch", "transformers", "peft", "polars"} <= names and "dagster" not in names
    spec = json.loads((local / "artifacts" / "agent_config.json").read_text())
    assert spec["format_version"] == 1
