"""The LM head projected on labelled positions only gives TRL's fused head's figures and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from recthinker_dagster.training.data import IGNORE_INDEX as IGNORE
from recthinker_dagster.training.scored_head import project_labelled_positions_only, score_positions


def _tiny_causal_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def _fused_pair(temperature: float, label_filter=None):
    from trl.trainer.utils import add_fused_lm_head

    trl_model = _tiny_causal_lm()
    add_fused_lm_head(trl_model, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
    compact_model = copy.deepcopy(trl_model)
    project_labelled_positions_only(compact_model, temperature=temperature, label_filter=label_filter)
    return trl_model, compact_model


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 20), generator=generator)
    attention = torch.ones_like(ids)
    attention[2, 15:] = 0
    labels = ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.6, IGNORE)
    labels[2, 15:] = IGNORE
    return ids, attention, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compact_head_gives_trls_log_probs_entropy_and_gradients(temperature):
    trl_model, compact_model = _fused_pair(temperature)
    ids, attention, labels = _batch()
    expected = trl_model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    got = compact_model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert torch.equal(got.label_mask, expected.label_mask)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.is_top1, expected.is_top1)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), (_, b) in zip(trl_model.named_parameters(), compact_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_label_filter_drops_positions_from_the_scores_and_the_loss():
    keep_first_row_only = lambda labels: labels.masked_fill(torch.arange(labels.shape[0])[:, None] > 0, IGNORE)  # noqa: E731
    trl_model, compact_model = _fused_pair(1.0, label_filter=keep_first_row_only)
    ids, attention, labels = _batch()
    expected = trl_model(input_ids=ids, attention_mask=attention, labels=keep_first_row_only(labels),
                         fused_lm_head=True)
    got = compact_model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert not got.label_mask[1:].any() and got.label_mask[0].any()
    assert torch.all(got.log_probs[1:] == 0)
    torch.testing.assert_close(got.log_probs, expected.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_no_labelled_position_gives_a_zero_loss_that_backpropagates():
    _, compact_model = _fused_pair(1.0)
    ids, attention, _ = _batch()
    got = compact_model(input_ids=ids, attention_mask=attention, labels=torch.full_like(ids, IGNORE),
                        fused_lm_head=True)
    assert float(got.loss.detach()) == 0.0
    got.loss.backward()  # connected to the model: an all-masked micro-batch does not break training


def test_without_the_fused_flag_the_model_forward_is_unchanged():
    trl_model, compact_model = _fused_pair(1.0)
    ids, attention, _ = _batch()
    torch.testing.assert_close(compact_model(input_ids=ids, attention_mask=attention).logits,
                               trl_model(input_ids=ids, attention_mask=attention).logits)


def test_score_positions_in_blocks_equals_one_block():
    head = torch.nn.Linear(8, 50, bias=True)
    states = torch.randn(37, 8)
    targets = torch.randint(0, 50, (37,))
    whole = score_positions(states, head, targets, 0.9, block=1024)
    blocks = score_positions(states, head, targets, 0.9, block=5)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b)
    logits = head(states) / 0.9
    torch.testing.assert_close(whole[0], torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0])


def test_grpo_passes_label_only_the_tokens_the_policy_sampled():
    from recthinker_dagster.training.grpo_trainer import ConstrainedAnswerGRPOTrainer

    trainer = object.__new__(ConstrainedAnswerGRPOTrainer)  # the filter alone, without a model
    trainer.receive_trained_masks([[1, 1, 0, 0, 1], [0, 1, 1]])
    trainer._scored, trainer._scored_row = trainer._trained_for(2, 5), 0
    labels = torch.arange(16).reshape(2, 8)  # 3 prompt positions, then the 5 completion positions
    first, second = trainer._trained_labels_only(labels[:1]), trainer._trained_labels_only(labels[1:])
    assert first.tolist() == [[0, 1, 2, 3, 4, IGNORE, IGNORE, 7]]
    assert second.tolist() == [[8, 9, 10, IGNORE, 12, 13, IGNORE, IGNORE]]
    with pytest.raises(RuntimeError, match="fewer rows"):
        trainer._trained_labels_only(labels[:1])
