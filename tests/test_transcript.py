"""Exact token transcripts: each turn's prompt is the previous prompt plus the sampled ids plus
the template's tokens, and GRPO trains on exactly the sampled ids (``agent/transcript.py``)."""

from __future__ import annotations

import math

import pytest

from recthinker_dagster.agent import AgentConfig, SamplingParams, run_agent
from recthinker_dagster.agent.backends.base import Generation
from recthinker_dagster.agent.transcript import TokenTranscript, TranscriptMismatch, environment_text
from recthinker_dagster.training.grpo import ToolRollout
from tests.support.trajectories import agent_tasks, call, toolbox_factory

# -- the transcript alone ---------------------------------------------------------------------


def test_transcript_masks_and_trims():
    transcript = TokenTranscript([1, 2, 3])
    transcript.add_sampled([4, 5], [-0.5, -0.25])
    transcript.add_environment([6, 7])
    transcript.add_sampled([8])  # the forced head's answer: no sampled log-prob
    transcript.add_environment([9])
    assert transcript.ids == [1, 2, 3, 4, 5, 6, 7, 8, 9] and transcript.sampled_ids() == [4, 5, 8]
    kept = transcript.trimmed()
    assert kept.completion_ids == [4, 5, 6, 7, 8] and kept.mask == [1, 1, 0, 0, 1]
    assert kept.trained_mask() == [1, 1, 0, 0, 0]  # the head's answer was never sampled: not trained
    assert kept.logprobs[:4] == [-0.5, -0.25, 0.0, 0.0] and math.isnan(kept.logprobs[4])
    transcript.check_prompt([1, 2, 3, 4, 5, 6, 7, 8, 9])
    with pytest.raises(TranscriptMismatch, match="part at token 4"):
        transcript.check_prompt([1, 2, 3, 4, 0, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="1 log-probs for 2"):
        transcript.add_sampled([1, 2], [0.0])


def _render(messages, tools, generation_prompt):
    text = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
    return text + ("<s>assistant\n" if generation_prompt else "")


def test_environment_text_is_what_follows_the_stop_token():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "call"},
                {"role": "tool", "content": "out"}]
    assert environment_text(_render, messages, None, 1, "</s>") == "\n<s>tool\nout</s>\n<s>assistant\n"

    def rewriting(messages, tools, generation_prompt):  # re-renders earlier turns once more follow
        return _render(messages, tools, generation_prompt).replace("call", "CALL" if len(messages) > 2 else "call")

    with pytest.raises(TranscriptMismatch, match="append-only"):
        environment_text(rewriting, messages, None, 1, "</s>")


# -- through the real loop, tools and tokenizer -------------------------------------------------


def _scripted_turns(tokenizer, labels: list[str]) -> list[list[int]]:
    """Token ids a policy might sample, deliberately not the tokenizer's own split
    (``Anal`` + ``ysis``), a tool call, then an answer; each turn ends with the stop token."""
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = ids("Anal") + ids("ysis: need scores.\nPlan: score.\n") + ids(call("score_candidates",
                                                                             weights={"bprmf": 1}))
    second = ids(f"Plan: rank.\n<answer>{', '.join(labels)}</answer>")
    return [first + [end], second + [end]]


@pytest.fixture(scope="module")
def scripted_backend(smollm2_float32):
    """The real TransformersBackend (tokenizer, template, transcripts) whose model is replaced
    by a script of token ids; it records every prompt it was sent."""
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    class ScriptedIds(TransformersBackend):
        def __init__(self, model, tokenizer):
            super().__init__(model, tokenizer, name="scripted-ids")
            self.prompts: list[list[int]] = []
            self.script: list[list[int]] = []

        def generate_ids(self, rows, params, answers=None):
            self.prompts += [list(row) for row in rows]
            turn = self.script[len(self.prompts) - 1]
            return [Generation(self.tokenizer.decode(turn[:-1]), len(row), len(turn), 0.0, "stop",
                               prompt_ids=list(row), token_ids=turn, logprobs=[-0.1] * len(turn)) for row in rows]

    model, tokenizer = smollm2_float32
    return ScriptedIds(model, tokenizer)


def test_the_trained_completion_is_exactly_the_sampled_ids(scripted_backend):
    backend = scripted_backend
    task = agent_tasks("train", 1)[0]
    labels = list(toolbox_factory(task).labels)
    backend.script = _scripted_turns(backend.tokenizer, labels)
    config = AgentConfig(max_turns=3, max_tool_calls=2, sampling=SamplingParams(max_new_tokens=64))
    trajectory = run_agent([task], backend, toolbox_factory, config)[0]
    assert trajectory.valid and trajectory.n_tool_calls == 1 and trajectory.finish == "answer"

    rollout = ToolRollout([task], toolbox_factory, config, backend.tokenizer)
    prompt, completion, mask, logprobs = rollout.training_tokens(trajectory)
    sampled = backend.script[0] + backend.script[1]
    assert [t for t, m in zip(completion, mask) if m] == sampled  # the split Anal+ysis survives
    assert prompt == backend.prompts[0]  # the exact first generation prompt
    second = backend.prompts[1]  # the second turn's prompt extends the first turn's tokens
    assert second == prompt + completion[: len(second) - len(prompt)]
    assert completion[-1] == backend.script[1][-1] and mask[-1] == 1  # ends where the policy stopped
    tool_text = backend.tokenizer.decode([t for t, m in zip(completion, mask) if not m])
    tool_output = next(m["content"] for m in trajectory.messages if m["role"] == "tool")
    assert tool_output[:60] in tool_text and tool_text.rstrip().endswith("<|im_start|>assistant")
    assert [lp for lp, m in zip(logprobs, mask) if m] == [-0.1] * len(sampled)
    # re-rendering the messages would have trained on other tokens: the reason for transcripts
    assert backend.encode(trajectory.messages[:3], trajectory.tools) != second


def test_the_forced_heads_answer_is_not_trained(scripted_backend):
    """A policy that never answers, even when asked: the label head ranks, and its answer stands
    in the transcript's last turn, but GRPO trains only the tokens the policy sampled."""
    backend = scripted_backend
    task = agent_tasks("train", 1)[0]
    labels = list(toolbox_factory(task).labels)
    first = _scripted_turns(backend.tokenizer, labels)[0]
    idle = backend.tokenizer.encode("Plan: look again.", add_special_tokens=False) + [first[-1]]
    backend.prompts, backend.script = [], [first] + [idle] * 4
    config = AgentConfig(max_turns=2, max_tool_calls=2, sampling=SamplingParams(max_new_tokens=64))
    trajectory = run_agent([task], backend, toolbox_factory, config)[0]
    assert trajectory.finish == "forced_head" and trajectory.valid

    prompt, completion, mask, logprobs = ToolRollout([task], toolbox_factory, config,
                                                     backend.tokenizer).training_tokens(trajectory)
    sampled = [token for turn in backend.script[: len(backend.prompts)] for token in turn]
    assert [t for t, m in zip(completion, mask) if m] == sampled
    head = backend.head_answer_ids(labels, trajectory.final_labels)
    assert completion[-len(head):] == head and not any(mask[-len(head):])
    assert all(math.isnan(lp) for lp in logprobs[-len(head):])


@pytest.mark.slow
def test_real_sampling_keeps_every_turn_an_extension(smollm2_float32):
    """The real model, sampling, the real tools: every turn's prompt extends the last one, the
    trained ids are the sampled ones, and the sampler's log-probs match a fresh forward pass."""
    import torch

    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend

    model, tokenizer = smollm2_float32
    seen: list[Generation] = []

    class Recording(TransformersBackend):
        def generate_ids(self, rows, params, answers=None):
            out = super().generate_ids(rows, params, answers)
            seen.extend(out)
            return out

    backend = Recording(model, tokenizer, batch_size=4)
    tasks = agent_tasks("train", 2)
    config = AgentConfig(max_turns=2, max_tool_calls=2, constrain_answers=False,  # log-probs of the model alone
                         sampling=SamplingParams(max_new_tokens=48, temperature=1.0, seed=3))
    trajectories = run_agent(tasks, backend, toolbox_factory, config)
    rollout = ToolRollout(tasks, toolbox_factory, config, backend.tokenizer)
    for trajectory in trajectories:
        prompt, completion, mask, logprobs = rollout.training_tokens(trajectory)
        full = prompt + completion
        mine = [g for g in seen if g.prompt_ids[: len(prompt)] == prompt and full[: len(g.prompt_ids)] == g.prompt_ids]
        assert len(mine) == trajectory.n_turns  # every turn's prompt is a prefix of the transcript
        sampled = [t for g in mine for t in g.token_ids]
        policy = [t for t, m in zip(completion, mask) if m]
        assert policy[: len(sampled)] == sampled  # the forced head's tokens may follow
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0, len(prompt) - 1 : -1].float()
        fresh = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        gaps = [abs(a - b) for a, b, m in zip(logprobs, fresh.tolist(), mask) if m and not math.isnan(a)]
        assert gaps and max(gaps) < 0.05  # float32, same tokens: sampler and trainer agree
