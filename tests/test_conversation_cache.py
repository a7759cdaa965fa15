"""The per-conversation KV cache: the store on its own, then the transformers backend over
several agent turns with a tiny model whose attention matters (fast; the real SmolLM2 check is
in ``tests/test_backends.py``).

The tiny models are the bigram model of ``tests/support/tiny_models.py`` with its attention
switched back on (a random output projection), so what they write depends on every earlier
token's KV: a wrong position, mask or KV row changes the greedy text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recthinker_dagster.agent import AgentConfig, run_agent
from recthinker_dagster.agent.backends.base import AnswerSpec, SamplingParams
from recthinker_dagster.agent.backends.conversation_cache import ConversationCache, Entry
from recthinker_dagster.agent.labels import candidate_labels
from tests.support.agent_fakes import FakeToolbox, task
from tests.support.tiny_models import bigram_model

LETTERS = tuple(candidate_labels(10))
GREEDY = SamplingParams(max_new_tokens=12)


# -- the store --------------------------------------------------------------------------------


def kv(tokens: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 1, tokens, 4), torch.zeros(1, 1, tokens, 4)) for _ in range(layers)]


def entry(ids, base=None, base_len: int = 0, prompt_len: int = 0) -> Entry:
    return Entry(np.asarray(ids, dtype=np.int64), base, base_len, kv(len(ids) - base_len), prompt_len)


def test_match_finds_the_longest_common_prefix_within_the_limit():
    store = ConversationCache()
    short, long = entry([1, 2, 3]), entry([1, 2, 3, 4, 5, 6])
    store.add(short)
    store.add(entry([9, 2, 3, 4]))
    store.add(long)  # drops ``short``: a prefix of it
    assert len(store) == 2
    assert store.match([1, 2, 3, 4, 7], limit=10) == (long, 4)
    assert store.match([1, 2, 3, 4, 5, 6, 7], limit=5) == (long, 5)
    assert store.match([5, 5], limit=10) == (None, 0)


def test_an_entry_replaces_the_one_it_continued_and_the_store_evicts_the_least_recent():
    store = ConversationCache(max_conversations=2)
    a, b = entry([1, 1, 1]), entry([2, 2, 2])
    store.add(a)
    store.add(b)
    a2 = entry([1, 1, 7, 7])  # a retokenized continuation of ``a``: not a prefix match, replaced anyway
    store.add(a2, replaces=a)
    assert set(store) == {b, a2} and store.evicted == 0
    store.match([2, 2], limit=5)  # ``b`` becomes the most recent
    store.add(entry([3, 3, 3]))
    assert a2 not in set(store) and b in set(store) and store.evicted == 1


def test_protected_entries_outlive_a_loop_over_more_conversations_than_fit():
    store = ConversationCache(max_conversations=2)
    first = [entry([k, k, k], prompt_len=2) for k in (1, 2, 3)]
    for e in first:
        store.add(e)
    assert set(store) == {first[1], first[2]}  # plain least-recently-used so far
    prompts = [[k, k, k, 9] for k in (1, 2, 3)]  # the next turn of every conversation
    store.protect(prompts)
    hits = []
    for prompt in prompts:
        source, length = store.match(prompt, limit=len(prompt) - 1)
        continued = source is not None and source.continued_by(length)
        hits.append(continued)
        store.add(entry(prompt, prompt_len=4), replaces=source if continued else None)
    store.release()
    assert hits == [False, True, True]  # conversation 1 could not push out 2 and 3 before their turn
    assert {int(e.tokens[0]) for e in store} == {2, 3}


def test_the_byte_bound_counts_a_shared_base_once():
    base = kv(100)
    first, second = entry(list(range(110)), base, 100), entry(list(range(100)) + [7] * 10, base, 100)
    store = ConversationCache(max_bytes=10**9)
    store.add(first)
    store.add(second)
    per_token = 2 * 2 * 4 * 4  # layers x (keys, values) x head_dim x float32 bytes
    assert store.nbytes == (100 + 10 + 10) * per_token
    assert [n for _, n in second.pieces(105)] == [100, 5] and [n for _, n in second.pieces(60)] == [60]
    tight = ConversationCache(max_bytes=115 * per_token)
    tight.add(first)
    tight.add(second)
    assert list(tight) == [second] and tight.evicted == 1


# -- the backend over several turns -------------------------------------------------------------


def attentive(tokenizer, chain: dict[str, str] | None, scale: float):
    model = bigram_model(tokenizer, chain)
    torch.manual_seed(1)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.normal_(0.0, scale)
    return model


@pytest.fixture(scope="module")
def tiny_model(smollm2_tokenizer):
    """The bigram model without a chain, its attention on: free text that depends on the KV."""
    return attentive(smollm2_tokenizer, {}, 2.0)


@pytest.fixture(scope="module")
def answering_model(smollm2_tokenizer):
    """The bigram model that opens ``<answer>`` at once, its attention on (it orders the labels)."""
    return attentive(smollm2_tokenizer, None, 0.5)


def backend(model, tokenizer, **kwargs):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    kwargs.setdefault("min_prefix_tokens", 4)
    return TransformersBackend(model, tokenizer, name="tiny", batch_size=4, **kwargs)


def conversations() -> list[list[dict]]:
    """Three conversations of different lengths that share their system prompt."""
    system = {"role": "system", "content": "You rank movies for a user. Call tools, then answer with labels."}
    return [[system, {"role": "user", "content": "History: " + ", ".join(f"Movie {k}" for k in range(n))}]
            for n in (4, 20, 40)]


def run_turns(chosen, n_turns: int = 3, params: SamplingParams = GREEDY) -> list[list[str]]:
    """``n_turns`` turns: each reply appended as the assistant turn, then a tool result."""
    convs = conversations()
    texts = []
    for turn in range(n_turns):
        generations = chosen.generate(convs, None, params)
        texts.append([g.text for g in generations])
        for k, (conv, generation) in enumerate(zip(convs, generations)):
            conv.append({"role": "assistant", "content": generation.text.strip()})
            conv.append({"role": "tool", "name": "get_item_info", "content": f"C{k}: Movie {turn}{k} | Drama"})
    return texts


def test_greedy_turns_are_the_same_with_and_without_the_cache(tiny_model, smollm2_tokenizer):
    cached = backend(tiny_model, smollm2_tokenizer)
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    alone = backend(tiny_model, smollm2_tokenizer, conversation_cache=False, prefix_cache=False)
    alone.batch_size = 1
    growing = backend(tiny_model, smollm2_tokenizer, static_cache=False)  # DynamicCache per pass
    texts = run_turns(cached)
    assert texts == run_turns(plain) == run_turns(alone) == run_turns(growing)
    assert len({text for turn in texts for text in turn}) > 3  # the rows really differ
    assert plain.conversations is None and plain.stats["conversation_tokens_reused"] == 0


def test_the_second_turn_reuses_the_first(tiny_model, smollm2_tokenizer):
    cached = backend(tiny_model, smollm2_tokenizer)
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    convs = conversations()
    first = cached.generate(convs, None, GREEDY)
    plain.generate(convs, None, GREEDY)
    assert cached.stats["conversation_tokens_reused"] == 0 and len(cached.conversations) == 3
    for conv, generation in zip(convs, first):
        conv += [{"role": "assistant", "content": generation.text.strip()},
                 {"role": "tool", "name": "get_item_info", "content": "C1: Heat | Action"}]
    mine, theirs = dict(cached.stats), dict(plain.stats)
    second = cached.generate(convs, None, GREEDY)
    plain.generate(convs, None, GREEDY)
    delta = {key: cached.stats[key] - mine[key] for key in mine}
    assert delta["prefilled_tokens"] + delta["prefix_tokens_reused"] + delta["conversation_tokens_reused"] \
        == sum(g.prompt_tokens for g in second)
    assert delta["conversation_tokens_reused"] > 2 * delta["prefilled_tokens"]
    assert delta["prefilled_tokens"] < (plain.stats["prefilled_tokens"] - theirs["prefilled_tokens"]) / 2
    assert len(cached.conversations) == 3  # each row replaced its first turn


def test_conversations_in_other_batches_share_their_start_but_keep_their_own_rows(tiny_model, smollm2_tokenizer):
    cached = backend(tiny_model, smollm2_tokenizer, max_cached_conversations=3)
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    cached.batch_size = plain.batch_size = 1  # one pass per conversation: the later ones find the first's start
    assert run_turns(cached) == run_turns(plain)
    assert len(cached.conversations) == 3 and cached.conversations.evicted == 0
    assert cached.stats["prefix_tokens_reused"] > 0  # the first turns, from the first conversation's row
    assert cached.stats["prefilled_tokens"] < plain.stats["prefilled_tokens"] / 2


def test_more_conversations_than_fit_keep_a_fixed_share_cached(tiny_model, smollm2_tokenizer):
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    small = backend(tiny_model, smollm2_tokenizer, max_cached_conversations=2)
    small.batch_size = plain.batch_size = 1  # three passes per turn, in turn
    assert run_turns(small, n_turns=4) == run_turns(plain, n_turns=4)
    assert len(small.conversations) == 2 and small.stats["conversation_tokens_reused"] > 0
    assert small.stats["prefilled_tokens"] < plain.stats["prefilled_tokens"] / 2


def test_by_default_the_store_grows_to_every_call_s_conversations(tiny_model, smollm2_tokenizer, monkeypatch):
    from recthinker_dagster.agent.backends import conversation_cache

    monkeypatch.setattr(conversation_cache, "MIN_CACHED_CONVERSATIONS", 2)
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    grown, fixed = backend(tiny_model, smollm2_tokenizer), backend(tiny_model, smollm2_tokenizer,
                                                                   max_cached_conversations=2)
    for chosen in (plain, grown, fixed):
        chosen.batch_size = 1  # three passes per turn, in turn
    expected = run_turns(plain, n_turns=3)
    assert run_turns(grown, n_turns=3) == expected == run_turns(fixed, n_turns=3)
    assert grown.conversations.max_conversations == 3 and fixed.conversations.max_conversations == 2
    assert grown.conversations.evicted == 0 and fixed.conversations.evicted > 0
    assert grown.stats["prefilled_tokens"] < fixed.stats["prefilled_tokens"]


def test_bounded_stores_evict_and_still_give_the_same_output(tiny_model, smollm2_tokenizer):
    expected = run_turns(backend(tiny_model, smollm2_tokenizer, conversation_cache=False), n_turns=2)
    one = backend(tiny_model, smollm2_tokenizer, max_cached_conversations=1)
    assert run_turns(one, n_turns=2) == expected
    assert len(one.conversations) == 1 and one.conversations.evicted >= 4
    tiny = backend(tiny_model, smollm2_tokenizer, conversation_cache_bytes=1)
    assert run_turns(tiny, n_turns=2) == expected
    assert len(tiny.conversations) == 0 and tiny.stats["conversation_tokens_reused"] == 0


def test_seeded_sampling_is_the_same_with_the_cache(tiny_model, smollm2_tokenizer):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    cached = backend(tiny_model, smollm2_tokenizer)
    assert run_turns(cached, params=params) == \
        run_turns(backend(tiny_model, smollm2_tokenizer, conversation_cache=False), params=params)
    assert cached.stats["conversation_tokens_reused"] > 0


def test_a_continued_answer_reuses_its_own_row(answering_model, smollm2_tokenizer):
    conv = [{"role": "user", "content": "Rank the candidates."}]
    params = SamplingParams(max_new_tokens=6)  # "<answer>" plus 3 tokens: the answer is cut, then continued
    cached = backend(answering_model, smollm2_tokenizer)
    plain = backend(answering_model, smollm2_tokenizer, conversation_cache=False)
    specs = [AnswerSpec(LETTERS), AnswerSpec(LETTERS[:4], "logits")]
    got = cached.generate([conv, conv], None, params, answers=specs)
    want = plain.generate([conv, conv], None, params, answers=specs)
    assert [g.text for g in got] == [g.text for g in want]
    assert got[0].text.startswith("<answer>") and got[0].text.endswith("</answer>")
    assert got[1].head_scores == pytest.approx(want[1].head_scores, abs=1e-4)
    assert cached.stats["conversation_tokens_reused"] >= len(cached.encode(conv)) + 5  # the continuation


def test_the_agent_loop_and_its_label_head_are_the_same_with_the_cache(tiny_model, smollm2_tokenizer):
    tasks = [task("u1"), task("u22"), task("u333")]
    config = AgentConfig(max_turns=2, sampling=SamplingParams(max_new_tokens=8))
    cached = backend(tiny_model, smollm2_tokenizer)
    plain = backend(tiny_model, smollm2_tokenizer, conversation_cache=False)
    got = run_agent(tasks, cached, FakeToolbox, config)
    want = run_agent(tasks, plain, FakeToolbox, config)
    assert [t.messages for t in got] == [t.messages for t in want]
    assert [t.final_labels for t in got] == [t.final_labels for t in want]
    assert [t.finish for t in got] == [t.finish for t in want]
    for mine, theirs in zip(got, want):
        if theirs.head_scores is not None:
            assert mine.head_scores == pytest.approx(theirs.head_scores, abs=1e-3)
    assert cached.stats["conversation_tokens_reused"] > cached.stats["prefilled_tokens"]
    labels = [sorted(t.final_labels) for t in got]
    scores = cached.rank_labels([t.messages for t in got], [t.tools for t in got], labels)
    expected = plain.rank_labels([t.messages for t in got], [t.tools for t in got], labels)
    for mine, theirs in zip(scores, expected):
        assert mine == pytest.approx(theirs, abs=1e-4)


def test_unfinished_rows_continue_alone_with_the_same_greedy_output(smollm2_tokenizer):
    """Rows that stop at different steps: once half have stopped, the rest continue in a pass of
    their own, and every row's tokens, text and log-probs are those of one undivided pass."""
    from tests.support.tiny_models import single_token

    params = SamplingParams(max_new_tokens=24)
    system = {"role": "system", "content": "You rank movies for a user."}
    convs = [[system, {"role": "user", "content": f"History: {', '.join(f'Movie {k}' for k in range(n))}"}]
             for n in (1, 3, 5, 8, 13, 21, 34, 55)]
    probe = backend(attentive(smollm2_tokenizer, {}, 2.0), smollm2_tokenizer, conversation_cache=False)
    probe.batch_size = len(convs)
    paths = [g.token_ids for g in probe.generate(convs, None, params)]

    def stop_steps(token: int) -> list[int]:  # per row: the step after the token's first use
        return [path.index(token) + 1 if token in path else len(path) for path in paths]

    # a token whose first use comes at different steps in different rows (absent in some);
    # making it the stop token's only predecessor leaves every path unchanged up to it
    texts = {token: smollm2_tokenizer.decode([token]) for path in paths for token in path}
    usable = [t for t, text in texts.items() if text.strip() and single_token(smollm2_tokenizer, text) == t]
    token = max(usable, key=lambda t: (len(set(stop_steps(t))), t))
    model = attentive(smollm2_tokenizer, {texts[token]: "<|im_end|>"}, 2.0)

    split = backend(model, smollm2_tokenizer, split_stragglers=True, min_split_rows=2)
    whole = backend(model, smollm2_tokenizer)
    split.batch_size = whole.batch_size = len(convs)
    got, want = split.generate(convs, None, params), whole.generate(convs, None, params)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [(g.text, g.finish_reason) for g in got] == [(g.text, g.finish_reason) for g in want]
    for mine, theirs in zip(got, want):
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
    assert len({len(g.token_ids) for g in got}) >= 3  # rows really stop at different steps
    assert split.stats["straggler_splits"] >= 1 and whole.stats["straggler_splits"] == 0


def test_a_wrapped_forward_still_gets_positions_that_skip_padding(tiny_model, smollm2_tokenizer):
    """GRPO's trainer wraps the policy's ``forward`` (``*args, **kwargs``: the scored head), and
    ``generate`` derives position ids from the mask only for a forward that names them: padded
    rows then ran at shifted positions, sampled from another distribution than the one trained.
    Every pass must get positions that count each row's real tokens only, and sample as the
    unwrapped model does."""
    import copy

    wrapped = copy.deepcopy(tiny_model)
    inner, seen = wrapped.forward, []

    def forward(*args, **kwargs):
        if kwargs.get("attention_mask") is not None:  # generate's passes (the shared prefix has none)
            seen.append((kwargs.get("position_ids"), kwargs["attention_mask"]))
        return inner(*args, **kwargs)

    wrapped.forward = forward
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    plain, other = backend(tiny_model, smollm2_tokenizer), backend(wrapped, smollm2_tokenizer)
    conv = conversations()
    for mine, theirs in zip(other.generate(conv, None, params), plain.generate(conv, None, params)):
        assert mine.token_ids == theirs.token_ids
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
    positions, mask = seen[0]  # the prefill: rows of different lengths, so padded
    assert positions is not None and bool((mask == 0).any())
    real = mask.sum(-1)
    assert positions[:, -1].tolist() == (real - 1).tolist()  # each row's last token: its length - 1
    assert run_turns(other) == run_turns(plain)
