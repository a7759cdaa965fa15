"""Constrained decoding inside <answer>: every sampled answer is a permutation of the labels.

Three levels: the logits processor alone on random logits (many seeds, temperatures, batch
rows, single- and multi-token labels), the transformers backend end to end with a tiny
bigram model that opens <answer> at once, and the real SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

from recthinker_dagster.agent.backends.base import AnswerSpec, SamplingParams
from recthinker_dagster.agent.backends.constrained import AnswerConstraint, AnswerState, LabelTokens
from recthinker_dagster.agent.labels import NUMBERED_STYLE, candidate_labels
from recthinker_dagster.agent.parser import parse_turn
from tests.support.tiny_models import bigram_model

LETTERS = tuple(candidate_labels(10))
NUMBERED = tuple(candidate_labels(12, NUMBERED_STYLE))  # C1 is a prefix of C10, C11, C12
TEMPERATURES = (0.0, 0.3, 1.0, 2.0)


def is_permutation(text: str, labels) -> bool:
    parsed = parse_turn(text, dict(zip(labels, labels)))
    return parsed.answer is not None and parsed.answer.complete and sorted(parsed.answer.labels) == sorted(labels)


def simulate(tokenizer, label_sets, *, seed: int, temperature: float, opens_at, steps: int = 80) -> list[str]:
    """Decode ``len(label_sets)`` rows from random logits through the processor; row ``r`` is
    pushed to write ``<answer>`` from step ``opens_at[r]`` (None: never)."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    opening = tokenizer.encode("<answer>", add_special_tokens=False)
    states = [AnswerState(LabelTokens.build(tokenizer, labels, stop)) if labels else None for labels in label_sets]
    processor = AnswerConstraint(tokenizer, states, [stop])
    generator = torch.Generator().manual_seed(seed)
    rows = len(label_sets)
    ids = torch.zeros((rows, 1), dtype=torch.long)
    done = [False] * rows
    answering = [row for row in range(rows) if label_sets[row] and opens_at[row] is not None]
    for step in range(steps):
        scores = torch.randn(rows, len(tokenizer), generator=generator) * 4
        for row, start in enumerate(opens_at):
            if start is not None and 0 <= step - start < len(opening):
                scores[row, opening[step - start]] += 100.0  # what the model would write
        scores = processor(ids, scores)
        if temperature > 0.0:  # sampling from softmax(scores / T), by the Gumbel-max trick
            uniform = torch.rand(scores.shape, generator=generator).clamp_min(1e-12)
            scores = scores / temperature - torch.log(-torch.log(uniform))
        chosen = torch.where(torch.tensor(done), torch.tensor(stop), scores.argmax(-1))
        done = [d or int(c) == stop for d, c in zip(done, chosen)]
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        if all(done[row] for row in answering):
            break
    return [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True) for row in ids]


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_the_processor_only_lets_permutations_through(smollm2_tokenizer, temperature):
    label_sets = [LETTERS, NUMBERED, LETTERS[:3], None, LETTERS]
    answered = 0
    for seed in range(10):
        texts = simulate(smollm2_tokenizer, label_sets, seed=seed, temperature=temperature,
                         opens_at=[seed % 4, 2, 0, 1, None])
        for text, labels in zip(texts[:3], label_sets[:3]):
            assert is_permutation(text, labels), (seed, text)
            answered += 1
        assert "<answer>" in texts[3] and not is_permutation(texts[3], LETTERS)  # no constraint for this row
        assert "<answer>" not in texts[4]  # never opened: free text, untouched
    assert answered == 30


def test_orders_differ_when_sampling(smollm2_tokenizer):
    orders = {simulate(smollm2_tokenizer, [LETTERS], seed=seed, temperature=1.0, opens_at=[0])[0]
              for seed in range(8)}
    assert len(orders) == 8  # the model (here: random logits) decides the order


@pytest.fixture(scope="module")
def tiny_backend(smollm2_tokenizer):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    torch.manual_seed(0)
    return TransformersBackend(bigram_model(smollm2_tokenizer), smollm2_tokenizer, name="bigram", batch_size=4,
                               min_prefix_tokens=4)


CONVERSATION = [{"role": "user", "content": "Rank the candidates."}]


@pytest.mark.parametrize("temperature", (0.0, 1.0, 2.0))
def test_backend_answers_are_permutations_over_seeds(tiny_backend, temperature):
    specs = [AnswerSpec(LETTERS), AnswerSpec(NUMBERED), AnswerSpec(LETTERS[:4]), None, AnswerSpec(LETTERS)]
    texts = set()
    for seed in range(4):
        params = SamplingParams(max_new_tokens=56, temperature=temperature, seed=seed)
        generations = tiny_backend.generate([CONVERSATION] * len(specs), None, params, answers=specs)
        for generation, spec in zip(generations, specs):
            if spec is None:
                assert not is_permutation(generation.text, LETTERS)  # no constraint: the bigram babbles
                continue
            assert generation.text.startswith("<answer>") and generation.finish_reason == "stop"
            assert is_permutation(generation.text, spec.labels), generation.text
        texts.add(generations[0].text)
    assert len(texts) == (1 if temperature == 0.0 else 4)  # greedy is deterministic; sampling varies


def test_an_answer_cut_by_the_token_limit_is_continued(tiny_backend):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)  # "<answer>" plus 3 tokens
    generations = tiny_backend.generate([CONVERSATION] * 2, None, params, answers=[AnswerSpec(LETTERS)] * 2)
    for generation in generations:
        assert is_permutation(generation.text, LETTERS) and generation.finish_reason == "stop"
        assert generation.completion_tokens == 3 + 10 + 9 + 3 + 1  # <answer>, labels, commas, </answer>, stop


@pytest.mark.slow
def test_smollm2_answers_are_permutations_over_seeds_and_temperatures(smollm_backend):
    labels = tuple(candidate_labels(10))
    lines = "\n".join(f"{label}: Movie {k}" for k, label in enumerate(labels))
    conversation = [
        {"role": "system", "content": "You rank movies. Reply only with the ranking as <answer>...</answer>."},
        {"role": "user", "content": "Candidates:\nA: Heat\nB: Up\nC: Alien\nRank all 3."},
        {"role": "assistant", "content": "<answer>B, C, A</answer>"},
        {"role": "user", "content": f"Candidates:\n{lines}\nRank all 10."},
    ]
    answered, orders = 0, set()
    for temperature in (0.0, 0.7, 1.3):
        for seed in range(3):
            params = SamplingParams(max_new_tokens=40, temperature=temperature, seed=seed)
            for generation in smollm_backend.generate([conversation] * 3, None, params,
                                                      answers=[AnswerSpec(labels)] * 3):
                if "<answer>" in generation.text:
                    assert is_permutation(generation.text, labels), generation.text
                    answered += 1
                    orders.add(generation.text)
    assert answered >= 9 and len(orders) > 1  # the few-shot prompt makes it answer; sampling varies


@pytest.fixture(scope="module")
def smollm_backend(smollm2_float32):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    model, tokenizer = smollm2_float32
    return TransformersBackend(model, tokenizer, name="smollm2", min_prefix_tokens=8)
