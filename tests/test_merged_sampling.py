"""Rollouts with the LoRA adapter merged into the weights (``merged_rollouts``): the merged
model computes what the adapter does, and afterwards the frozen weights are exactly as before."""

from __future__ import annotations

import pytest
import torch

from recthinker_dagster.training.merged_sampling import UnsupportedAdapter, merged_adapter
from tests.support.tiny_models import tiny_lora_policy

IDS = torch.tensor([[3, 9, 14, 2, 27, 5, 11]])


def _frozen(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" not in name}


def test_the_merged_model_computes_the_adapter_and_the_weights_come_back_exactly():
    policy = tiny_lora_policy()
    frozen, before = _frozen(policy), policy(IDS).logits
    assert not torch.allclose(before, _without_adapter(policy))  # the adapter matters
    with merged_adapter(policy) as merged:
        inside = merged(IDS).logits
        changed = [name for name, p in policy.named_parameters() if "lora_" not in name and
                   not torch.equal(p, frozen[name])]
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)
    assert len(changed) == 2 * 3  # 2 layers x the 3 adapted modules, nothing else
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if "lora_" not in name)
    assert torch.equal(policy(IDS).logits, before)  # the adapter is enabled again
    assert all(p.requires_grad for name, p in policy.named_parameters() if "lora_" in name)


def _without_adapter(policy):
    with policy.disable_adapter():
        return policy(IDS).logits


def test_bf16_weights_come_back_bit_for_bit_after_many_merges():
    policy = tiny_lora_policy(torch.bfloat16)
    frozen = _frozen(policy)
    for _ in range(5):  # a subtraction would leave bf16 round-off behind, step after step
        with merged_adapter(policy):
            policy(IDS)
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if "lora_" not in name)


def test_an_error_inside_restores_the_weights():
    policy = tiny_lora_policy()
    frozen = _frozen(policy)
    with pytest.raises(RuntimeError, match="rollout failed"), merged_adapter(policy):
        raise RuntimeError("rollout failed")
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if "lora_" not in name)
    assert not policy.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters


def test_a_model_without_adapter_is_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    with merged_adapter(model) as same:
        assert same is model


def test_a_lora_variant_is_refused_and_nothing_changes():
    policy = tiny_lora_policy(use_dora=True)
    frozen = _frozen(policy)
    with pytest.raises(UnsupportedAdapter, match="plain LoRA"), merged_adapter(policy):
        pass
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if "lora_" not in name)


@pytest.mark.slow
def test_grpo_steps_sample_through_the_merged_adapter(tmp_path, tiny_base_model, monkeypatch):
    from recthinker_dagster.training import grpo
    from recthinker_dagster.training.rl_recipes import load_rl_recipe
    from tests.support.trajectories import agent_tasks, length_reward, toolbox_factory

    entered: list[int] = []
    original = grpo.merged_adapter

    def counting(model):
        entered.append(sum(1 for name, _ in model.named_parameters() if "lora_A" in name))
        return original(model)

    monkeypatch.setattr(grpo, "merged_adapter", counting)
    recipe = load_rl_recipe("smoke").with_overrides(name="test-merged", max_steps=2, learning_rate=5e-3, max_turns=1,
                                                    max_new_tokens=24, per_device_train_batch_size=1,
                                                    merged_rollouts=True)
    result = grpo.train_grpo(agent_tasks("train", 2), toolbox_factory, tiny_base_model, [], tmp_path, recipe,
                             extra_reward_funcs=[length_reward])
    assert len(entered) == 2 and entered[0] > 0  # both steps sampled through the merge, with the adapter on
    assert result.metrics["steps"][-1]["grad_norm"] > 0
    assert "rollout/sampler_logprob_abs_gap" in result.metrics["steps"][-1]


def test_merged_rollouts_refuse_a_generation_server(tmp_path):
    from recthinker_dagster.training.grpo import train_grpo
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    recipe = load_rl_recipe("smoke").with_overrides(merged_rollouts=True)
    with pytest.raises(ValueError, match="generation server loads the adapter itself"):
        train_grpo([object()] * 8, None, tmp_path, [], tmp_path, recipe, backend_factory=lambda model, tok: None)
