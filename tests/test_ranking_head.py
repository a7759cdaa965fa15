"""The ranking head (``answer_mode: logits``) and the forced head: hand-computed rankings from
fake logits, the backend's one forward pass against a direct one, the loop's rules, and (slow)
100% valid answers of the untrained SmolLM2 with tools in both modes on real tasks."""

from __future__ import annotations

import math

import pytest
import torch

from recthinker_dagster.agent import AgentConfig, Generation, run_agent
from recthinker_dagster.agent.backends.base import AnswerSpec, SamplingParams, head_ranking
from recthinker_dagster.agent.backends.constrained import AnswerState, LabelTokens
from recthinker_dagster.agent.labels import NUMBERED_STYLE, candidate_labels
from recthinker_dagster.training.rewards import REWARDS, RolloutOutcome
from tests.support.agent_fakes import FakeToolbox, task
from tests.support.tiny_models import bigram_model, single_token

CONVERSATION = [{"role": "user", "content": "Rank the candidates."}]


def test_the_head_orders_labels_by_their_logits_at_the_answer_position(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    state = AnswerState(LabelTokens.build(tok, ("A", "B", "C"), stop), mode="logits")
    scores = torch.full((len(tok),), -5.0)
    scores[single_token(tok, "A")], scores[single_token(tok, " A")] = 1.0, 2.5  # A: either spelling
    scores[single_token(tok, "B")] = 3.0
    scores[single_token(tok, "C")], scores[single_token(tok, " C")] = 2.0, -5.0
    state.start_head(scores)
    # hand-computed: log p(label) = logsumexp over its spellings of log_softmax(scores)
    norm = math.log(sum(math.exp(v) for v in scores.tolist()))
    expected = {"A": math.log(math.exp(1.0) + math.exp(2.5)) - norm, "B": math.log(math.exp(3.0) + math.exp(-5.0)) - norm,
                "C": math.log(math.exp(2.0) + math.exp(-5.0)) - norm}
    assert state.head_scores == pytest.approx(expected, abs=1e-4)
    assert head_ranking(state.head_scores, ["A", "B", "C"]) == ["B", "A", "C"]
    assert tok.decode(state.queue) == "B, A, C</answer><|im_end|>"


def test_head_ties_keep_candidate_order():
    assert head_ranking({"A": 0.0, "B": 1.0, "C": 1.0, "D": 0.0}, ["A", "B", "C", "D"]) == ["B", "C", "A", "D"]


@pytest.fixture(scope="module")
def tiny_backend(smollm2_tokenizer):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    return TransformersBackend(bigram_model(smollm2_tokenizer, noise=8.0), smollm2_tokenizer, name="bigram",
                               batch_size=4, min_prefix_tokens=4)


def direct_log_probs(backend, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_rank_labels_is_one_forward_pass_at_the_answer_position(tiny_backend):
    labels = tuple(candidate_labels(10))
    (scores,) = tiny_backend.rank_labels([CONVERSATION], None, [labels])
    prompt = tiny_backend.encode(CONVERSATION) + tiny_backend.tokenizer.encode("<answer>", add_special_tokens=False)
    logp = direct_log_probs(tiny_backend, prompt)[-1]
    tok = tiny_backend.tokenizer
    expected = {label: float(torch.logsumexp(logp[[single_token(tok, label), single_token(tok, " " + label)]], 0))
                for label in labels}
    assert scores == pytest.approx(expected, abs=1e-4)
    # in logits mode a greedy answer is that ranking, read at the same position (a sampled one
    # draws its first label: tests/test_answer_logprobs.py)
    (generation,) = tiny_backend.generate([CONVERSATION], None, SamplingParams(max_new_tokens=40, temperature=0.0),
                                          answers=[AnswerSpec(labels, "logits")])
    order = head_ranking(expected, labels)
    assert generation.text == f"<answer>{', '.join(order)}</answer>"
    assert generation.head_scores == pytest.approx(expected, abs=1e-4)


def test_multi_token_labels_are_scored_token_by_token(tiny_backend):
    labels = tuple(candidate_labels(12, NUMBERED_STYLE))  # C1 is a prefix of C10..C12
    (scores,) = tiny_backend.rank_labels([CONVERSATION], None, [labels])
    prompt = tiny_backend.encode(CONVERSATION) + tiny_backend.tokenizer.encode("<answer>", add_special_tokens=False)
    tok = tiny_backend.tokenizer
    expected = {}
    for label in labels:
        totals = []
        for spelling in (label, " " + label):
            seq = tok.encode(spelling, add_special_tokens=False)
            logp = direct_log_probs(tiny_backend, prompt + seq)
            totals.append(sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(seq)))
        expected[label] = math.log(sum(math.exp(t) for t in totals))
    assert scores == pytest.approx(expected, abs=1e-3)
    (generation,) = tiny_backend.generate([CONVERSATION], None, SamplingParams(max_new_tokens=40),
                                          answers=[AnswerSpec(labels, "logits")])
    assert generation.text == f"<answer>{', '.join(head_ranking(scores, labels))}</answer>"


class HeadBackend:
    """A local-model stand-in: scripted replies, answers specs recorded, a label head with fixed scores."""

    name = "head"
    constrains_answers = True

    def __init__(self, replies, scores):
        self.replies, self.scores, self.specs = list(replies), scores, []

    def generate(self, conversations, tools, params, answers=None):
        self.specs.append(answers)
        return [Generation(self.replies.pop(0) if self.replies else "Analysis: hmm.", 100, 10) for _ in conversations]

    def rank_labels(self, conversations, tools, labels):
        return [{label: self.scores[label] for label in label_set} for label_set in labels]


SCORES = {"C1": -3.0, "C2": -0.5, "C3": -1.0, "C4": -2.0}


def test_a_model_that_never_answers_is_asked_once_then_ranked_by_the_head():
    backend = HeadBackend(["Analysis: thinking.", "Analysis: still thinking."], SCORES)
    (t,) = run_agent([task("u1", target_index=2)], backend, FakeToolbox, AgentConfig(max_turns=1))
    assert backend.specs[0] == [AnswerSpec(("C1", "C2", "C3", "C4"), "generate")]
    assert "Give your final ranking" in t.messages[3]["content"]  # asked once
    assert t.messages[-1] == {"role": "assistant", "content": "<answer>C2, C3, C4, C1</answer>"}
    assert t.finish == "forced_head" and t.valid and not t.repaired and t.reasons == ["forced_head"]
    assert t.final_labels == ["C2", "C3", "C4", "C1"] and t.head_scores == SCORES and t.n_turns == 2
    outcome = RolloutOutcome.from_trajectory(t, max_tool_calls=8)
    assert outcome.valid and not outcome.answered and outcome.target_rank == 2
    assert REWARDS["ranking"](outcome) == pytest.approx(1 / math.log2(3)) and REWARDS["format"](outcome) == 0.0


def test_logits_mode_records_the_head_and_needs_a_backend_with_one():
    scores = {"C1": -2.0, "C2": -1.0, "C3": -3.0, "C4": -4.0}

    class Answering(HeadBackend):
        def generate(self, conversations, tools, params, answers=None):
            self.specs.append(answers)
            return [Generation("Analysis: done.\nPlan: rank.\n<answer>C2, C1, C3, C4</answer>", head_scores=scores)]

    backend = Answering([], scores)
    (t,) = run_agent([task("u1")], backend, FakeToolbox, AgentConfig(answer_mode="logits"))
    assert backend.specs[0][0].mode == "logits"
    assert t.answer_mode == "logits" and t.finish == "answer" and t.valid and t.head_scores == scores

    class NoHead:
        name = "http"

        def generate(self, conversations, tools, params):
            return []

    with pytest.raises(ValueError, match="needs a backend with a label head"):
        run_agent([task("u1")], NoHead(), FakeToolbox, AgentConfig(answer_mode="logits"))
    with pytest.raises(ValueError, match="answer_mode must be one of"):
        AgentConfig(answer_mode="beam")


@pytest.mark.slow
@pytest.mark.parametrize("answer_mode", ["generate", "logits"])
def test_untrained_smollm2_with_tools_always_gives_a_valid_answer(answer_mode, request, repo_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend
    from tests.support.trajectories import agent_tasks, toolbox_factory

    path = repo_root / "assets" / "base_model"
    if not (path / "model.safetensors").exists():
        path, _ = request.getfixturevalue("prepared_base_model")
    torch.set_num_threads(2)
    backend = TransformersBackend(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                  AutoTokenizer.from_pretrained(path), name="smollm2", batch_size=4)
    config = AgentConfig(max_turns=2, max_tool_calls=2, sampling=SamplingParams(max_new_tokens=96),
                         answer_mode=answer_mode)
    tasks = agent_tasks("eval", 4)
    trajectories = run_agent(tasks, backend, toolbox_factory, config)
    for task_, t in zip(tasks, trajectories):
        assert t.valid and not t.repaired and t.finish in ("answer", "forced_answer", "forced_head"), t.reasons
        assert sorted(t.final_ranking) == sorted(task_.candidate_item_ids) and t.answer_mode == answer_mode
        if t.finish == "forced_head" or answer_mode == "logits":  # the head ranked: its scores are recorded
            assert t.head_scores is not None and set(t.head_scores) == set(t.final_labels)


def test_a_greedy_generate_rollout_read_by_the_head_is_the_logits_mode_rollout(tiny_backend):
    from recthinker_dagster.evaluation.llm_systems import read_by_head
    from tests.support.trajectories import rl_task_source

    tasks, factory = rl_task_source("valid", 6)

    def rollouts(mode: str):
        config = AgentConfig(max_turns=2, max_tool_calls=2, sampling=SamplingParams(max_new_tokens=40),
                             answer_mode=mode, producer="policy")
        return run_agent(tasks, tiny_backend, factory, config)

    generated, headed = rollouts("generate"), rollouts("logits")
    assert all(t.head_scores is not None for t in generated)  # recorded although the model wrote its own order
    read = [read_by_head(t, "policy") for t in generated]
    for mine, theirs in zip(read, headed):
        assert mine is not None and mine.answer_mode == theirs.answer_mode == "logits"
        assert mine.final_labels == theirs.final_labels and mine.final_ranking == theirs.final_ranking
        assert mine.messages == theirs.messages and mine.metrics == theirs.metrics
        assert mine.head_scores == theirs.head_scores and mine.finish == theirs.finish and mine.valid
    assert any(g.final_labels != h.final_labels for g, h in zip(generated, headed))  # the modes do differ


def test_which_generate_mode_system_a_logits_mode_system_is_read_from():
    from recthinker_dagster.evaluation.llm_systems import generate_twin

    settings = {"max_turns": 4, "max_tool_calls": 4, "max_new_tokens": 32}
    systems = ["sft", "sft@logits", "sft_rl@logits"]
    assert generate_twin("sft@logits", systems, settings) == "sft"
    assert generate_twin("sft_rl@logits", systems, settings) is None  # no generate-mode sft_rl runs
    assert generate_twin("sft", systems, settings) is None
    logits_default = {**settings, "answer_mode": "logits"}
    assert generate_twin("sft", ["sft", "sft@generate"], logits_default) == "sft@generate"


def test_the_evaluation_reads_a_logits_mode_twin_from_the_generate_mode_rollouts(tiny_backend, monkeypatch,
                                                                                tmp_path):
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend
    from recthinker_dagster.evaluation.llm_systems import Policy, read_by_head, run_llm_systems
    from recthinker_dagster.models import loading
    from tests.support.trajectories import rl_task_source

    tasks, factory = rl_task_source("valid", 4)
    monkeypatch.setattr(loading, "load_agent_model", lambda base, adapters: (tiny_backend.model, tiny_backend.tokenizer))
    calls = []
    real_generate = TransformersBackend.generate

    def counted(self, conversations, *args, **kwargs):
        calls.append(len(conversations))
        return real_generate(self, conversations, *args, **kwargs)

    monkeypatch.setattr(TransformersBackend, "generate", counted)
    settings = {"max_turns": 2, "max_tool_calls": 2, "max_new_tokens": 40, "batch_size": 4}
    policy = Policy(tmp_path / "model")
    found = run_llm_systems({"sft@logits": policy, "sft": policy}, tasks, factory, settings)
    assert list(found) == ["sft@logits", "sft"]
    generate_calls = len(calls)
    alone = run_llm_systems({"sft": policy}, tasks, factory, settings)["sft"]
    assert len(calls) == 2 * generate_calls  # the twin generated nothing of its own

    def timeless(trajectories):
        return [{k: v for k, v in t.to_dict().items() if k != "latency_s"} for t in trajectories]

    assert timeless(found["sft"]) == timeless(alone)
    assert timeless(found["sft@logits"]) == timeless(read_by_head(t, "sft@logits") for t in alone)
    assert all(t.producer == "sft@logits" and t.answer_mode == "logits" for t in found["sft@logits"])
