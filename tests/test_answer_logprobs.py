"""The learner scores answer tokens under the constraint they were sampled with
(``training/answer_logprobs.py``, ``training/grpo_trainer.py``).

The replayed constraint must be the one the sampler applied: with a tiny bigram model that
opens <answer> at once, the trainer-side log-probs (a fresh forward pass, log-softmax over the
replayed allowed ids) equal the sampler's recorded ones, and differ from the unconstrained ones."""

from __future__ import annotations

import pytest
import torch

from recthinker_dagster.agent.backends.base import AnswerSpec, SamplingParams
from recthinker_dagster.agent.backends.constrained import HeadDraw, replay_answer
from recthinker_dagster.agent.labels import NUMBERED_STYLE, candidate_labels
from recthinker_dagster.training.answer_logprobs import (
    FREE,
    allowed_table,
    drawn_label_log_prob,
    head_draw_logprobs,
    head_draw_tables,
    log_prob_among,
    restrict_logprobs,
)
from tests.support.tiny_models import bigram_model

LETTERS = tuple(candidate_labels(10))
NUMBERED = tuple(candidate_labels(12, NUMBERED_STYLE))  # multi-token labels: C1 is a prefix of C10


@pytest.fixture(scope="module")
def tiny_backend(smollm2_tokenizer):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    torch.manual_seed(0)
    return TransformersBackend(bigram_model(smollm2_tokenizer), smollm2_tokenizer, name="bigram", batch_size=4,
                               min_prefix_tokens=4)


@pytest.mark.parametrize("labels", [LETTERS, NUMBERED], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("temperature,answer_temperature", [(0.7, None), (1.5, None), (1.0, 3.0)])
def test_replayed_constraint_gives_back_the_samplers_log_probs(tiny_backend, labels, temperature, answer_temperature):
    """... also when the labels are sampled at an answer temperature of their own."""
    tokenizer = tiny_backend.tokenizer
    conversation = [{"role": "user", "content": "Rank the candidates."}]
    tokens = tiny_backend.label_tokens(labels)
    for seed in range(3):
        params = SamplingParams(max_new_tokens=64, temperature=temperature, seed=seed,
                                answer_temperature=answer_temperature)
        generation = tiny_backend.generate([conversation], None, params, answers=[AnswerSpec(labels)])[0]
        ids = generation.token_ids
        allowed, _, draws = replay_answer(tokens, ids, lambda t: tokenizer.decode([t], skip_special_tokens=False),
                                          tiny_backend.stop_ids)
        assert not any(draws)  # generate mode: the policy writes its own order
        constrained = [k for k, a in enumerate(allowed) if a is not None]
        assert constrained and all(ids[k] in allowed[k] for k in constrained)
        assert all(allowed[k] is None for k in range(constrained[0]))  # "<answer>" itself was free
        mine, plain = learner_log_probs(tiny_backend, generation, allowed, constrained, temperature,
                                        answer_temperature)
        sampled = torch.tensor([generation.logprobs[k] for k in constrained])
        assert torch.allclose(mine, sampled, atol=1e-3), (mine - sampled).abs().max()
        assert (plain - sampled).abs().max() > 0.1  # the whole-vocabulary figure is another distribution
        forced = [k for k in constrained if len(allowed[k]) == 1]
        assert forced and all(generation.logprobs[k] == 0.0 for k in forced)  # ",", "</answer>", the stop


def learner_log_probs(backend, generation, allowed, constrained, temperature, answer_temperature=None):
    """A fresh forward pass's log-probs of the sampled ids at the ``constrained`` positions: among
    the replayed ``allowed`` ids (as the GRPO trainer scores them), and over the whole vocabulary."""
    ids = generation.token_ids
    full = torch.tensor([generation.prompt_ids + ids])
    with torch.no_grad():
        logits = backend.model(input_ids=full).logits[0, len(generation.prompt_ids) - 1 : -1].float()
    logits = logits / temperature
    table = allowed_table([allowed], len(ids))[0]
    at = torch.tensor(constrained)
    scores = logits[at].gather(1, table[at].clamp(min=0)) * temperature / (answer_temperature or temperature)
    plain = torch.log_softmax(logits[at], dim=-1).gather(1, torch.tensor(ids)[at, None])[:, 0]
    return log_prob_among(scores, table[at], torch.tensor(ids)[at]), plain


def test_a_sampled_logits_mode_answer_is_a_plackett_luce_draw_from_the_head(tiny_backend):
    """In ``logits`` mode a sampled rollout draws every label from the head's scores at the first
    label position, without replacement; the replay forces every answer token and gives each
    label its draw, so the learner's Plackett-Luce log-probs (all read at that one position)
    equal the sampler's, and the forced tokens score 0."""
    tokenizer = tiny_backend.tokenizer
    tokens = tiny_backend.label_tokens(LETTERS)
    orders = set()
    for seed in range(6):
        params = SamplingParams(max_new_tokens=64, temperature=1.0, seed=seed, answer_temperature=3.0)
        generation = tiny_backend.generate([[{"role": "user", "content": "Rank."}]], None, params,
                                           answers=[AnswerSpec(LETTERS, "logits")])[0]
        ids = generation.token_ids
        allowed, _, draws = replay_answer(tokens, ids, lambda t: tokenizer.decode([t], skip_special_tokens=False),
                                          tiny_backend.stop_ids, mode="logits")
        constrained = [k for k, a in enumerate(allowed) if a is not None]
        drawn = [k for k, d in enumerate(draws) if d is not None]
        assert all(allowed[k] == [ids[k]] for k in constrained)  # every answer token: forced
        assert len(drawn) == len(LETTERS) and {draws[k].source for k in drawn} == {drawn[0]}
        assert [len(draws[k].groups) for k in drawn] == list(range(len(LETTERS), 0, -1))  # without replacement
        assert all(generation.logprobs[k] == 0.0 for k in constrained if k not in drawn)
        with torch.no_grad():
            logits = tiny_backend.model(input_ids=torch.tensor([generation.prompt_ids + ids])).logits[0].float()
        source, groups = (table[0] for table in head_draw_tables([draws], len(ids)))
        at = torch.tensor(drawn)
        scores = logits[len(generation.prompt_ids) - 1 + source[at]]
        mine = drawn_label_log_prob(scores[torch.arange(len(drawn))[:, None, None], groups[at].clamp(min=0)],
                                    groups[at], 3.0)
        sampled = torch.tensor([generation.logprobs[k] for k in drawn])
        assert torch.allclose(mine, sampled, atol=1e-3), (mine - sampled).abs().max()
        assert sampled[-1] == 0.0 and all(sampled[:-1] < 0)  # the last label is the only one left
        order = [label.strip() for label in tokenizer.decode(ids).split("<answer>")[1].split("</answer>")[0].split(",")]
        assert sorted(order) == sorted(LETTERS)
        orders.add(tuple(order))
    assert len(orders) > 1  # drawn, not the head's ranking every time


def test_head_draw_log_probs_match_a_hand_computed_plackett_luce_term_scored_at_the_source():
    torch.manual_seed(0)
    vocab, width, hidden_size = 12, 5, 8
    head = torch.nn.Linear(hidden_size, vocab, bias=True)
    hidden = torch.randn(1, 3 + width, hidden_size, requires_grad=True)  # 3 prompt + 5 completion tokens
    logps = torch.zeros(1, width)
    draws = [[None, HeadDraw(1, ((4, 5), (6,), (2, 3))), None, HeadDraw(1, ((2, 3), (6,))), None]]
    source, groups = head_draw_tables(draws, width)
    assert groups.shape == (1, width, 3, 2) and source[0].tolist() == [FREE, 1, FREE, 1, FREE]
    scored = head_draw_logprobs(logps, hidden, head, source, groups, 2.0)

    def by_hand(label_groups):
        logits = head(hidden[0, 2 + 1])  # the hidden state that predicts completion token 1
        labels = torch.stack([logits[list(ids)].logsumexp(0) for ids in label_groups]) / 2.0
        return torch.log_softmax(labels, dim=0)[0]

    assert torch.allclose(scored[0, 1], by_hand(((4, 5), (6,), (2, 3))), atol=1e-6)
    assert torch.allclose(scored[0, 3], by_hand(((2, 3), (6,))), atol=1e-6)
    assert scored[0, [0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    scored.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    touched = hidden.grad[0].abs().sum(dim=1) > 0
    assert touched.tolist() == [k == 3 for k in range(3 + width)]  # only the source's predicting state


@pytest.mark.parametrize("labels", [LETTERS, NUMBERED], ids=["single-token", "multi-token"])
def test_a_label_counts_as_placed_from_the_token_after_its_own(tiny_backend, labels):
    """``replay_answer`` marks the sampled ids after the answer wrote a label, never the label's
    own tokens: the GRPO trainer gives those ids no advantage (the reward is settled)."""
    tokenizer = tiny_backend.tokenizer
    decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    tokens = tiny_backend.label_tokens(labels)
    params = SamplingParams(max_new_tokens=64, temperature=1.0, seed=1)
    generation = tiny_backend.generate([[{"role": "user", "content": "Rank."}]], None, params,
                                       answers=[AnswerSpec(labels)])[0]
    ids = generation.token_ids
    text = tokenizer.decode(ids)
    order = [label.strip() for label in text.split("<answer>")[1].split("</answer>")[0].split(",")]
    for rank in (0, 4, len(order) - 1):
        placed = replay_answer(tokens, ids, decode, tiny_backend.stop_ids, order[rank])[1]
        first = placed.index(True)
        assert not any(placed[:first]) and all(placed[first:])  # once placed, placed for good
        # the ids before the first placed one spell the answer up to and including that label
        written = tokenizer.decode(ids[:first]).split("<answer>")[1]
        assert [label.strip() for label in written.split(",")] == order[: rank + 1]
    assert not any(replay_answer(tokens, ids, decode, tiny_backend.stop_ids, "not a label")[1])


def test_restricted_log_probs_match_a_hand_computed_softmax_and_forced_tokens_get_no_gradient():
    torch.manual_seed(0)
    vocab, width, hidden_size = 12, 4, 8
    head = torch.nn.Linear(hidden_size, vocab, bias=True)
    hidden = torch.randn(2, 3 + width, hidden_size, requires_grad=True)  # 3 prompt + 4 completion tokens
    completion = torch.tensor([[5, 2, 7, 1], [3, 3, 9, 0]])
    logps = torch.log_softmax(head(hidden[:, 2:-1]), dim=-1).gather(2, completion[..., None])[..., 0]
    rows = [[None, [2, 4, 6], [7], None], [[3, 8], None, None, [0, 1, 2]]]
    restricted = restrict_logprobs(logps, hidden, head, completion, allowed_table(rows, width), 1.0)

    def by_hand(row, position, ids):
        scores = head(hidden[row, 2 + position])[ids]
        return torch.log_softmax(scores, dim=-1)[ids.index(int(completion[row, position]))]

    for row, positions in enumerate(rows):
        for position, ids in enumerate(positions):
            expected = logps[row, position] if ids is None else by_hand(row, position, ids)
            assert torch.allclose(restricted[row, position], expected, atol=1e-6), (row, position)
    assert restricted[0, 2] == 0.0  # forced: the policy had no choice
    restricted[0, 2].backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0
    table = allowed_table(rows, width)
    assert table.shape == (2, 4, 3) and int(table[0, 0, 0]) == FREE and table[1, 3].tolist() == [0, 1, 2]


def test_a_token_outside_its_allowed_set_is_refused():
    with pytest.raises(ValueError, match="not among the ids"):
        log_prob_among(torch.zeros(1, 2), torch.tensor([[4, 5]]), torch.tensor([6]))
