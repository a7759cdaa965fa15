"""GRPO rollouts on a generation server: each step's LoRA adapter is loaded on the server under a
new name (vLLM's runtime LoRA updates), sampled from, and unloaded; here against the local
OpenAI-compatible stub (``tests/support/openai_stub.py``) and a tiny model."""

from __future__ import annotations

import os
import socket

import pytest

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.settings import RLSettings
from recthinker_dagster.training.policy_server import PolicyServer, PolicyServerError
from tests.support.trajectories import agent_tasks, length_reward, toolbox_factory


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture()
def lora_policy(tiny_base_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def test_each_step_loads_the_new_adapter_and_unloads_the_last(openai_server, lora_policy, tmp_path):
    server = PolicyServer(_url(openai_server), tmp_path / "adapters")
    first = server(lora_policy, None)
    assert openai_server.adapters == {first.model} and first.model.startswith(f"policy-{os.getpid()}-")
    assert (tmp_path / "adapters" / first.model / "adapter_config.json").is_file()
    second = server(lora_policy, None)
    assert openai_server.adapters == {second.model} != {first.model}
    assert not (tmp_path / "adapters" / first.model).exists()  # the unloaded step's folder is gone
    [reply] = second.generate([[{"role": "user", "content": "rank"}]], None, SamplingParams(max_new_tokens=8))
    assert "<tool_call>" in reply.text and reply.finish_reason == "stop"  # sampled from the loaded adapter
    server.close()
    assert openai_server.adapters == set()
    loads = [r["body"]["lora_name"] for r in openai_server.requests if r["path"] == "/v1/load_lora_adapter"]
    assert loads == [first.model, second.model]


def test_a_refused_adapter_a_full_model_and_no_server_are_clear_errors(openai_server, lora_policy, tiny_base_model,
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    openai_server.adapters.add(f"policy-{os.getpid()}-1")  # the server already holds that name
    refused = r"HTTP 400: .*already been loaded.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve"
    with pytest.raises(PolicyServerError, match=refused):
        PolicyServer(_url(openai_server), tmp_path / "a")(lora_policy, None)
    with pytest.raises(PolicyServerError, match="need a LoRA policy"):
        PolicyServer(_url(openai_server), tmp_path / "b")(AutoModelForCausalLM.from_pretrained(tiny_base_model), None)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PolicyServerError, match=f"cannot reach the generation server at http://127.0.0.1:{port}/v1"):
        PolicyServer(f"http://127.0.0.1:{port}", tmp_path / "c", timeout_s=5)(lora_policy, None)


def test_logits_rollouts_cannot_run_on_a_server():
    assert RLSettings(rollout_server="http://h:8000").rollout_server == "http://h:8000"
    with pytest.raises(ValueError, match="rollout_server: 'logits' rollouts read the label head"):
        RLSettings(answer_mode="logits", rollout_server="http://h:8000")


@pytest.mark.slow
def test_grpo_samples_every_step_on_the_server(openai_server, tiny_base_model, tmp_path):
    from recthinker_dagster.training.grpo import train_grpo
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    recipe = load_rl_recipe("smoke").with_overrides(name="served", max_steps=2, max_turns=2,
                                                    per_device_train_batch_size=1, learning_rate=5e-3)
    server = PolicyServer(_url(openai_server), tmp_path / "adapters")
    result = train_grpo(agent_tasks("train", 2), toolbox_factory, tiny_base_model, [], tmp_path / "run", recipe,
                        backend_factory=server, extra_reward_funcs=[length_reward])

    assert result.global_step == 2 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    loads = [r["body"]["lora_name"] for r in openai_server.requests if r["path"] == "/v1/load_lora_adapter"]
    chats = [r["body"]["model"] for r in openai_server.requests if r["path"] == "/v1/chat/completions"]
    assert len(loads) == 2 and set(chats) == set(loads)  # one adapter per step, every rollout sampled there
    assert openai_server.adapters == set()  # the last one unloaded at the end
    for step in result.metrics["steps"]:
        assert step["tools/call_frequency"] == 1.0  # the served agent's tool call ran here, with the real tools


def test_the_stage_samples_in_process_unless_a_server_is_set(tmp_path):
    from recthinker_dagster.training.policy_server import SERVED_ADAPTERS, policy_server

    assert policy_server(None, tmp_path) is None
    server = policy_server("http://h:8000", tmp_path, concurrency=4)
    assert server.root == "http://h:8000/v1" and server.adapters_dir == tmp_path / SERVED_ADAPTERS
    assert server.concurrency == 4
