"""SFT: the assistant-only loss mask, a tiny real LoRA run on SmolLM2 (slow), resumption, validation.

Trajectories come from a scripted investigator driving the real tools on ML-1M
(``tests/support/trajectories.py``). For speed the training examples carry only the schemas of
the tools they call (~1.8k instead of ~2.5k tokens).
"""

from __future__ import annotations

import json

import pytest

from recthinker_dagster.agent import AgentConfig, SamplingParams, parse_turn
from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template
from recthinker_dagster.training import load_recipe, train_sft
from recthinker_dagster.training.data import (
    IGNORE_INDEX,
    sft_examples,
    tokenize_conversation,
    tokenize_examples,
    tokenized_trajectory_file,
    training_chat_template,
)
from recthinker_dagster.training.filtering import assistant_text, candidate_labels
from recthinker_dagster.training.validation import ValidationSuite, evaluate_policy
from tests.support.trajectories import agent_tasks, real_trajectories, toolbox_factory


class Interrupted(RuntimeError):
    pass


def interrupt_after_save(at_step: int):
    """A callback that kills training right after checkpoint ``at_step`` is written."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                raise Interrupted(f"killed after saving step {at_step}")

    return Kill()


def short_example(t) -> dict:
    used = {call.name for call in t.tool_calls}
    return {"messages": t.messages, "tools": [s for s in t.tools if s["function"]["name"] in used],
            "task_id": t.task_id}


@pytest.fixture(scope="module")
def tokenizer(prepared_base_model):
    from transformers import AutoTokenizer

    return ensure_tool_chat_template(AutoTokenizer.from_pretrained(prepared_base_model[0]))


@pytest.fixture(scope="module")
def trajectories():
    return list(real_trajectories("train"))


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_only_assistant_turns_are_labelled(tokenizer, trajectories):
    t = trajectories[0]
    roles = [m["role"] for m in t.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    row = tokenize_conversation(tokenizer, t.messages, t.tools, training_chat_template(tokenizer))
    ids, labels = row["input_ids"], row["labels"]

    # the training template renders exactly what the agent sees at inference
    plain = tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False)
    assert tokenizer.decode(ids) == plain
    assert ids == tokenizer(plain, add_special_tokens=False)["input_ids"]

    # one labelled span per assistant turn: its text, its tool calls and <|im_end|>, nothing else
    spans = [tokenizer.decode(span) for span in labelled_spans(ids, labels)]
    assistants = [m for m in t.messages if m["role"] == "assistant"]
    assert spans == ["\n" + assistant_text(m) + "<|im_end|>\n" for m in assistants]
    assert '<tool_call>\n{"name": "score_candidates", "arguments": {"weights": {"bprmf": 1.0}}}\n</tool_call>' in spans[0]
    assert spans[1].startswith("\nAnalysis:") and "<answer>" in spans[1]
    # the labelled first turn parses back to the very calls the loop ran
    parsed = parse_turn(spans[0].removesuffix("<|im_end|>\n"), candidate_labels(t))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(c.name, c.arguments) for c in t.tool_calls]

    # everything else (system prompt, tool schemas, user turn, tool results, role headers) is -100
    masked = tokenizer.decode([tok for tok, label in zip(ids, labels) if label == IGNORE_INDEX])
    for message in t.messages:
        if message["role"] != "assistant":
            assert message["content"] in masked
            assert all(message["content"][:80] not in span for span in spans)
    assert "- find_similar_users(limit): " in masked  # a tool's line in the system turn
    assert masked.count("<|im_start|>assistant") == 2 and all("<|im_start|>" not in s for s in spans)
    assert sum(label != IGNORE_INDEX for label in labels) == sum(len(s) for s in labelled_spans(ids, labels))


def test_raw_messages_in_a_dataset_would_corrupt_tool_arguments(trajectories):
    """Why the trainer gets token ids: Arrow merges every call's ``arguments`` into one struct."""
    import datasets

    t = trajectories[0]
    rows = datasets.Dataset.from_list([{"messages": t.messages}])[0]["messages"]
    profile_call = rows[2]["tool_calls"][0]["function"]
    assert profile_call["name"] == "get_user_profile" and profile_call["arguments"] == {"weights": None}
    assert sft_examples([t])[0]["messages"][2]["tool_calls"][0]["function"]["arguments"] == {}


def test_long_or_unlabelled_examples_are_dropped_not_cut(tokenizer, trajectories):
    examples = sft_examples(trajectories[:3]) + [{"messages": trajectories[0].messages[:2], "tools": []}]
    lengths = sorted(len(tokenize_conversation(tokenizer, e["messages"], e["tools"],
                                               training_chat_template(tokenizer))["input_ids"])
                     for e in examples[:3])
    rows, stats = tokenize_examples(tokenizer, examples, max_length=lengths[1])
    assert stats["n_examples"] == len(rows) == 2 and stats["n_dropped_too_long"] == 1
    assert stats["n_dropped_no_labels"] == 1 and stats["tokens_max"] == lengths[1]


def test_a_trajectory_file_reads_its_first_trajectories_tokenized_as_sft_tokenizes_them(tokenizer, trajectories,
                                                                                         tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(t.to_dict()) + "\n\n" for t in trajectories[:3]))  # blank lines skipped
    rows = tokenized_trajectory_file(tokenizer, path, 2)
    assert rows == tokenize_examples(tokenizer, sft_examples(trajectories[:2]), None)[0]
    assert len(tokenized_trajectory_file(tokenizer, path)) == 3


# -- a real run: interrupted after step 1, resumed to step 2 -------------------------------------


@pytest.fixture(scope="module")
def resumed_run(prepared_base_model, trajectories, tmp_path_factory):
    base, _ = prepared_base_model
    out = tmp_path_factory.mktemp("sft")
    recipe = load_recipe("smoke").with_overrides(
        name="test", max_steps=2, save_steps=1, gradient_accumulation_steps=1, learning_rate=1e-3,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lr_scheduler_type="constant")
    data = [short_example(t) for t in trajectories[:4]]
    with pytest.raises(Interrupted):
        train_sft(data, base, out, recipe, callbacks=[interrupt_after_save(1)])
    after_kill = sorted(p.name for p in out.iterdir()) + sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    result = train_sft(data, base, out, recipe)
    return base, out, after_kill, result


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(resumed_run):
    _, out, after_kill, result = resumed_run
    assert after_kill == ["checkpoints", "checkpoint-1"]  # no adapter or metrics yet, no later checkpoint
    assert result.resumed_from == "checkpoint-1" and result.global_step == 2
    metrics = result.metrics
    assert metrics["steps_this_run"] == 1 and metrics["resumed_from"] == "checkpoint-1"
    assert [s["step"] for s in metrics["steps"]] == [1, 2]  # step 1 restored from the checkpoint's state
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


@pytest.mark.slow
def test_the_adapter_is_saved_alone_and_changes_the_model(resumed_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _, _, result = resumed_run
    names = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith("model") for name in names)  # no base weights
    assert (result.adapter_dir / "adapter_model.safetensors").stat().st_size < 10_000_000
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and {"q_proj", "down_proj"} <= set(config["target_modules"])

    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)  # carries the tool template
    assert "Tools:\n- probe(): d<|im_end|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=[_schema()], tokenize=False)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(result.adapter_dir))
    ids = tokenizer("Analysis: the user likes dramas.\nPlan:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (tuned - plain).abs().max().item() > 1e-3


@pytest.mark.slow
def test_run_metrics(resumed_run):
    _, out, _, result = resumed_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["recipe"] == "test" and metrics["global_step"] == 2
    for step in metrics["steps"]:
        assert step["loss"] > 0 and step["learning_rate"] == pytest.approx(1e-3)
    assert metrics["final_loss"] == metrics["steps"][-1]["loss"]
    assert metrics["tokens_per_second"] > 0 and metrics["seconds_per_step"] > 0
    assert metrics["n_examples"] == 4 and 1000 < metrics["tokens_mean"] < 3072
    assert 0 < metrics["trained_tokens_seen"] < metrics["tokens_seen"]
    assert metrics["precision"] in ("bf16", "fp32") and metrics["trainable_parameters"] > 0


@pytest.mark.slow
def test_evaluate_policy_runs_the_agent_with_the_adapter(resumed_run):
    base, _, _, result = resumed_run
    suites = [ValidationSuite("ml-1m", agent_tasks("valid", 2), toolbox_factory)]
    config = AgentConfig(max_turns=1, max_tool_calls=2, sampling=SamplingParams(max_new_tokens=24))
    report = evaluate_policy(base, [result.adapter_dir], suites, config, batch_size=2)
    scores = report["overall"]
    assert scores["n_tasks"] == 2 and report["by_dataset"]["ml-1m"]["n_tasks"] == 2
    assert report["producer"] == result.adapter_dir.parent.name  # the run folder holding the adapter
    for key in ("ndcg@1", "ndcg@5", "ndcg@10", "valid_rate", "tool_calls_per_task"):
        assert 0.0 <= scores[key] <= (2.0 if key == "tool_calls_per_task" else 1.0)


def _schema() -> dict:
    return {"type": "function", "function": {"name": "probe", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}


# -- recipes -------------------------------------------------------------------------------------


def test_named_recipes_load(tmp_path):
    from recthinker_dagster.training import SFTRecipe, available_recipes

    assert {"smoke", "demo", "full"} <= set(available_recipes())
    smoke, full = load_recipe("smoke"), load_recipe("full")
    assert smoke.max_steps > 0 and smoke.lora_r == 8 and smoke.per_device_train_batch_size == 1
    assert smoke.filter_config.max_tokens <= smoke.max_length
    assert "eval" not in smoke.to_dict()  # the validation run is a profile setting (sft.validation)
    assert full.precision == "bf16" and full.device == "cuda" and full.lora_r > smoke.lora_r
    for name in available_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.filter_config.max_tokens <= recipe.max_length
        assert SFTRecipe.from_dict(recipe.to_dict()) == recipe

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**smoke.to_dict(), "name": "mine", "lora_r": 2}))
    mine = load_recipe(path)
    assert mine.lora_r == 2 and mine.digest != smoke.digest
    assert smoke.with_overrides(max_steps=1).max_steps == 1 and smoke.max_steps != 1
    with pytest.raises(ValueError, match="unknown recipe keys"):
        smoke.with_overrides(lora_rank=2)
    with pytest.raises(ValueError, match="unknown recipe keys"):
        smoke.with_overrides(eval={"n_tasks": 2})
    with pytest.raises(ValueError, match="precision"):
        smoke.with_overrides(precision="int8")
    with pytest.raises(FileNotFoundError, match="smoke"):
        load_recipe("no-such-recipe")


def test_recipe_fields_are_type_checked_naming_the_field(tmp_path):
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    smoke = load_recipe("smoke")
    # YAML 1.1 reads 1e-4 (no dot) as a string: a float field takes it as the number it means
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nlearning_rate: 1e-4\n")
    assert load_recipe(path).learning_rate == 1e-4
    assert smoke.with_overrides(num_train_epochs=2).num_train_epochs == 2  # an int is a valid float
    assert smoke.with_overrides(num_threads=None).num_threads is None
    for field_name, value, expected in [("learning_rate", "fast", "float"), ("max_steps", 2.5, "int"),
                                        ("max_steps", "8", "int"), ("gradient_checkpointing", "yes", "bool"),
                                        ("num_threads", "two", r"int \| None")]:
        with pytest.raises(ValueError, match=f"recipe field '{field_name}' must be {expected}"):
            smoke.with_overrides(**{field_name: value})
    with pytest.raises(ValueError, match="RL recipe field 'beta' must be float"):
        load_rl_recipe("smoke").with_overrides(beta=[0.1])
