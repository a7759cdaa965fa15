"""Backends: the local transformers one on the real SmolLM2 model, the OpenAI-compatible one
against a real HTTP server on 127.0.0.1 (canned replies, failures, slowness, tool calls)."""

from __future__ import annotations

import time

import pytest

from recthinker_dagster.agent import AgentConfig, SamplingParams, parse_turn, run_agent
from recthinker_dagster.agent.backends.chat_template import (
    ensure_tool_chat_template,
    renders_tools,
)
from recthinker_dagster.agent.backends.openai_backend import (
    OpenAICompatibleBackend,
    chat_completions_url,
    to_wire_messages,
)
from tests.support.agent_fakes import FakeToolbox, task

TOOLS = FakeToolbox(task("u0")).schemas()[:1]


def conversation(user: str, liked: str) -> list[dict]:
    return [
        {"role": "system", "content": "You rank movies for a user. Use tools when needed; answer with labels."},
        {"role": "user", "content": f"User {user}'s history: {liked}.\nCandidates: C1: Heat, C2: Toy Story.\nRank them."},
    ]


# -- TransformersBackend on the real model ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm2_float32):
    """(model, tokenizer) in float32, loaded once for this module."""
    return smollm2_float32


@pytest.fixture(scope="module")
def backends(smollm):
    from recthinker_dagster.agent.backends.transformers_backend import (
        TransformersBackend,
    )

    model, tokenizer = smollm
    cached = TransformersBackend(model, tokenizer, name="smollm2", prefix_cache=True, min_prefix_tokens=8)
    plain = TransformersBackend(model, tokenizer, name="smollm2", prefix_cache=False)
    growing = TransformersBackend(model, tokenizer, prefix_cache=True, min_prefix_tokens=8, static_cache=False)
    return cached, plain, growing


@pytest.mark.slow
def test_smollm2_gets_the_compact_tool_template(smollm):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(smollm[1].name_or_path)
    assert not renders_tools(fresh)  # SmolLM2's own template drops tools
    ensure_tool_chat_template(fresh)
    assert renders_tools(fresh)
    text = fresh.apply_chat_template(conversation("1", "Heat"), tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou rank movies") and "\n\nTools:\n- " in text
    assert "<tools>" not in text  # one line per tool, not Qwen2.5's JSON schemas
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_batched_generation_matches_one_at_a_time(smollm, backends):
    import torch

    model, tokenizer = smollm
    cached, plain, growing = backends
    convs = [conversation("1", "Heat and Casino and Fargo and Seven"), conversation("22", "Toy Story")]
    params = SamplingParams(max_new_tokens=5)
    batched = plain.generate(convs, None, params)
    assert len(batched) == 2 and batched[0].prompt_tokens > batched[1].prompt_tokens  # input order kept
    # the shorter prompt was left-padded in the batch: it must match an unpadded run
    ids = torch.tensor([plain.encode(convs[1])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         eos_token_id=plain.stop_ids, pad_token_id=plain.pad_id)
    alone = out[0, ids.shape[1]:].tolist()
    alone = alone[: next((i for i, t in enumerate(alone) if t in plain.stop_ids), len(alone))]
    assert batched[1].text == tokenizer.decode(alone)
    for generation in batched:
        assert 1 <= generation.completion_tokens <= 5 and generation.seconds > 0
        assert generation.finish_reason in ("stop", "length")

    with_prefix = cached.generate(convs, None, params)  # [shared prefix][padding][own tokens]
    assert [g.text for g in with_prefix] == [g.text for g in batched]
    assert [g.text for g in growing.generate(convs, None, params)] == [g.text for g in batched]  # DynamicCache
    assert cached.stats["prefix_tokens_reused"] >= 2 * 20 and cached.cached_prefixes == 1
    again = cached.generate(convs[:1], None, params)  # a later turn reuses the stored prefix
    assert again[0].text == batched[0].text and cached.cached_prefixes == 1


@pytest.mark.slow
def test_decoding_without_padding_runs_masked_with_the_same_output(smollm, monkeypatch):
    """One conversation has no padding, so transformers drops the mask; every decoding step must
    still reach SDPA with one (the fast grouped-query path on CPU), and greedy output must not change."""
    from transformers.integrations import sdpa_attention

    from recthinker_dagster.agent.backends import attention
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    model, tokenizer = smollm
    backend = TransformersBackend(model, tokenizer, prefix_cache=False, conversation_cache=False)
    assert model.config._attn_implementation == attention.NAME
    seen: list[tuple[int, bool]] = []  # (query length, mask given) per layer call
    original = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[2], attention_mask is not None))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    params = SamplingParams(max_new_tokens=6)
    masked = backend.generate([conversation("7", "Heat and Fargo")], None, params)[0]
    assert any(length == 1 for length, _ in seen) and all(given for length, given in seen if length == 1)
    try:
        model.config._attn_implementation = "sdpa"  # transformers' own path, unmasked decoding
        plain = backend.generate([conversation("7", "Heat and Fargo")], None, params)[0]
    finally:
        model.config._attn_implementation = attention.NAME
    assert masked.token_ids == plain.token_ids and masked.completion_tokens >= 2


@pytest.mark.slow
def test_multi_turn_greedy_is_the_same_with_the_conversation_cache(smollm):
    """Three agent-like turns (each reply appended, then a tool result) of rows of different
    lengths: the conversation cache reuses each row's KV, token for token the same output."""
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    model, tokenizer = smollm
    cached = TransformersBackend(model, tokenizer, min_prefix_tokens=8)
    plain = TransformersBackend(model, tokenizer, min_prefix_tokens=8, conversation_cache=False)
    params = SamplingParams(max_new_tokens=24)

    def turns(backend) -> list[str]:
        convs = [conversation("1", "Heat, Casino, Fargo and Seven"), conversation("22", "Toy Story")]
        texts = []
        for turn in range(3):
            for conv, generation in zip(convs, backend.generate(convs, [TOOLS] * 2, params)):
                texts.append(generation.text)
                conv.append({"role": "assistant", "content": generation.text.strip()})
                conv.append({"role": "tool", "name": "get_item_info", "content": f"C{turn + 1}: Heat (1995) | Action"})
        return texts

    assert turns(cached) == turns(plain)
    assert cached.stats["conversation_tokens_reused"] > 2 * cached.stats["prefilled_tokens"]
    assert cached.stats["prompt_tokens"] == plain.stats["prompt_tokens"]


@pytest.mark.slow
def test_context_overflow_is_an_error_generation_not_an_exception(backends):
    plain = backends[1]
    limit, plain.max_context_tokens = plain.max_context_tokens, 40
    try:
        (generation,) = plain.generate([conversation("1", "Heat")], None, SamplingParams(max_new_tokens=8))
    finally:
        plain.max_context_tokens = limit
    assert generation.finish_reason == "error" and generation.error.startswith("context overflow")


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(backends):
    plain = backends[1]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.95, seed=11)
    first = plain.generate([conversation("5", "Heat")], None, params)[0].text
    assert plain.generate([conversation("5", "Heat")], None, params)[0].text == first


# -- OpenAICompatibleBackend against a real local server ---------------------------------------


@pytest.fixture()
def server(openai_server):
    return openai_server


def backend_for(server, model, **kwargs):
    kwargs.setdefault("backoff_s", 0.01)
    return OpenAICompatibleBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", model, "sk-test", **kwargs)


def test_settings_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("RECTHINKER_LLM_MODEL", "plain")
    backend = OpenAICompatibleBackend()
    (generation,) = backend.generate([conversation("1", "Heat")], [TOOLS], SamplingParams(max_new_tokens=32, seed=3))
    assert generation.text.startswith("echo: User 1's history")
    assert (generation.prompt_tokens, generation.completion_tokens, generation.finish_reason) == (50, 7, "stop")
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-env"
    body = request["body"]
    assert body["tools"] == TOOLS and body["max_tokens"] == 32 and body["temperature"] == 0.0 and body["seed"] == 3
    monkeypatch.delenv("RECTHINKER_LLM_MODEL")
    with pytest.raises(ValueError):
        OpenAICompatibleBackend()
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_retries_on_500_and_429(server):
    for model in ("flaky", "ratelimited"):
        (generation,) = backend_for(server, model).generate([conversation("1", "Heat")], None, SamplingParams())
        assert generation.finish_reason == "stop" and generation.text.startswith("echo:")
        assert server.counts[model] == 2


def test_client_errors_are_not_retried(server):
    (generation,) = backend_for(server, "bad").generate([conversation("1", "Heat")], None, SamplingParams())
    assert generation.finish_reason == "error" and generation.error.startswith("HTTP 400")
    assert server.counts["bad"] == 1


def test_timeouts_are_retried_then_reported(server):
    backend = backend_for(server, "slow", timeout_s=0.3, max_retries=1)
    started = time.perf_counter()
    (generation,) = backend.generate([conversation("1", "Heat")], None, SamplingParams())
    assert time.perf_counter() - started < 1.5
    assert generation.finish_reason == "error" and "timed out" in generation.error
    assert server.counts["slow"] == 2


def test_tool_calls_come_back_as_parseable_text(server):
    (generation,) = backend_for(server, "tools").generate([conversation("1", "Heat")], [TOOLS], SamplingParams())
    assert '<tool_call>\n{"name": "get_item_info", "arguments": {"label": "C2"}}\n</tool_call>' in generation.text
    parsed = parse_turn(generation.text, {"C1": "a", "C2": "b"}, {"get_item_info"})
    assert [call.error_kind for call in parsed.tool_calls] == [None, "malformed_json"]
    assert parsed.analysis == "a" and parsed.plan == "b"


def test_requests_run_concurrently_and_keep_order(server):
    convs = [conversation(str(i), "Heat") for i in range(6)]
    started = time.perf_counter()
    generations = backend_for(server, "sleepy", concurrency=6).generate(convs, None, SamplingParams())
    assert time.perf_counter() - started < 6 * 0.4 * 0.6
    assert [g.text[:13] for g in generations] == [f"echo: User {i}'" for i in range(6)]


def test_wire_messages():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "Plan: x", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "name": "f", "tool_call_id": "c1", "content": "r"},
        {"role": "tool", "name": "invalid_tool_call", "content": "Error: bad"},
    ]
    wire = to_wire_messages(messages)
    assert wire[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert wire[2] == {"role": "tool", "tool_call_id": "c1", "content": "r"}
    assert wire[3] == {"role": "user", "content": "<tool_response>\nError: bad\n</tool_response>"}


def test_agent_loop_over_http(server):
    backend = backend_for(server, "agent")
    (t,) = run_agent([task("u1")], backend, FakeToolbox, AgentConfig())
    assert t.finish == "answer" and t.valid and t.final_labels == ["C2", "C1", "C3", "C4"]
    assert t.n_tool_calls == 1 and t.tool_calls[0].ok and t.producer == "agent"
    assert (t.prompt_tokens, t.completion_tokens) == (100, 14)
    second = server.requests[1]["body"]["messages"]
    assert second[2]["tool_calls"][0]["function"]["arguments"] == '{"label": "C2"}'
    assert second[3]["role"] == "tool" and second[3]["content"] == "C2: Movie u1-i2 | Drama"


def test_http_answers_take_the_documented_repair_and_are_counted(server):
    backend = backend_for(server, "sloppy")
    (t,) = run_agent([task("u1")], backend, FakeToolbox, AgentConfig())
    assert "answers" not in server.requests[0]["body"]  # nothing constrains an HTTP server's answer
    assert t.final_labels == ["C3", "C1", "C2", "C4"]  # repeat and unknown dropped, missing appended in order
    assert t.repaired and not t.valid and t.finish == "answer"
    assert set(t.reasons) == {"partial_answer:2", "duplicate_labels:1", "unknown_labels:C8"}


# -- generation servers for the evaluation and the served agent (vLLM's role) -------------------


def test_evaluation_systems_in_served_models_generate_on_the_server(server, monkeypatch, tmp_path):
    from recthinker_dagster.evaluation.llm_systems import Policy, run_llm_systems

    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    settings = {"max_turns": 4, "max_tool_calls": 4, "max_new_tokens": 32, "served_models": {"sft": "agent"}}
    # no model folder exists: a served system must not load one
    found = run_llm_systems({"sft": Policy(tmp_path / "no-model")}, [task("u1"), task("u2")], FakeToolbox, settings)
    assert [t.final_labels for t in found["sft"]] == [["C2", "C1", "C3", "C4"]] * 2
    assert all(t.valid and t.n_tool_calls == 1 and t.producer == "sft" for t in found["sft"])
    assert server.counts["agent"] == 4  # two tasks, two turns each


def test_served_models_must_be_llm_systems_in_generate_mode():
    from recthinker_dagster.settings import EvaluationSettings

    assert EvaluationSettings(served_models={"sft": "recthinker-sft"}).served_models == {"sft": "recthinker-sft"}
    with pytest.raises(ValueError, match="not an LLM system"):
        EvaluationSettings(served_models={"bprmf": "x"})
    with pytest.raises(ValueError, match="'logits' mode"):
        EvaluationSettings(served_models={"sft@logits": "x"})
    with pytest.raises(ValueError, match="'logits' mode"):
        EvaluationSettings(answer_mode="logits", served_models={"sft": "x"})
