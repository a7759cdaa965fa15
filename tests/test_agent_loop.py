"""The batched agent loop with a scripted backend and a fake toolbox: flow, budgets, records."""

from __future__ import annotations

import json
import re

import pytest

from recthinker_dagster.agent import (
    AgentConfig,
    Generation,
    SamplingParams,
    Trajectory,
    run_agent,
)
from recthinker_dagster.agent.loop import BUDGET_EXHAUSTED, TOOL_EXCEPTION
from recthinker_dagster.agent.prompts import final_answer_request, no_action_nudge
from tests.support.agent_fakes import FakeToolbox, task


class ScriptedBackend:
    """Replies from a per-user script; records the batch size of every call."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list]):
        self.scripts = {user: list(replies) for user, replies in scripts.items()}
        self.batches: list[int] = []
        self.seen: list[list[dict]] = []

    def generate(self, conversations, tools, params):
        assert len(tools) == len(conversations) and isinstance(params, SamplingParams)
        self.batches.append(len(conversations))
        out = []
        for messages in conversations:
            self.seen.append([dict(m) for m in messages])
            user = re.search(r"User (\S+)'s", messages[1]["content"]).group(1)
            reply = self.scripts[user].pop(0) if self.scripts[user] else "Analysis: ...\nPlan: keep thinking."
            out.append(reply if isinstance(reply, Generation) else Generation(reply, 100, 10, 0.5, "stop"))
        return out


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


ANALYSIS = "Analysis: likes dramas; C2 unknown.\nPlan: look at C2.\n"
LABELS = ["C1", "C2", "C3", "C4"]  # the fake toolbox's numbered labels
FINAL_REQUEST = final_answer_request(LABELS)["content"]


def run(scripts, tasks=None, **config):
    backend = ScriptedBackend(scripts)
    tasks = tasks or [task(user) for user in scripts]
    trajectories = run_agent(tasks, backend, FakeToolbox, AgentConfig(**config))
    return backend, trajectories


def test_two_tasks_are_batched_and_recorded():
    backend, (a, b) = run({
        "u1": [ANALYSIS + call("get_item_info", label="C2"), "Analysis: C2 fits.\nPlan: rank.\n<answer>C2, C1, C3, C4</answer>"],
        "u2": ["Analysis: enough.\nPlan: rank.\n<answer>C4, C3, C2, C1</answer>"],
    })
    assert backend.batches == [2, 1]
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assistant = a.messages[2]
    assert assistant["content"] == ANALYSIS.strip()
    assert assistant["tool_calls"][0]["function"] == {"name": "get_item_info", "arguments": {"label": "C2"}}
    assert a.messages[3]["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert a.messages[3]["content"] == "C2: Movie u1-i2 | Drama"
    assert "1. Heat (1995) | Action" in a.messages[1]["content"] and "C4: Movie u1-i4" in a.messages[1]["content"]
    assert "at most 6 turns and 8 tool calls" in a.messages[0]["content"]
    assert a.final_ranking == ["u1-i2", "u1-i1", "u1-i3", "u1-i4"] and a.final_labels[0] == "C2"
    assert a.valid and a.finish == "answer" and a.reasons == []
    assert a.metrics["ndcg@1"] == 1.0 and a.metrics["mrr"] == 1.0
    assert (a.n_turns, a.n_tool_calls, a.n_invalid_calls) == (2, 1, 0)
    assert (a.prompt_tokens, a.completion_tokens) == (200, 20) and a.latency_s >= 1.0
    assert a.tool_calls[0].name == "get_item_info" and a.tool_calls[0].ok and a.tool_calls[0].output_chars > 0
    assert b.final_ranking[0] == "u2-i4" and b.metrics["hr@5"] == 1.0 and b.metrics["ndcg@1"] == 0.0
    assert (b.producer, b.group, b.split, b.dataset) == ("scripted", "sparse", "eval", "ml-1m")


def test_malformed_calls_get_error_observations_and_the_model_recovers():
    _, (t,) = run({"u1": [
        "Plan: look.\n<tool_call>{\"name\": \"get_item_info\", \"arguments\": {\"label\": \"C2\"}</tool_call>\n"
        + call("no_such_tool") + call("get_item_info", label="C9") + call("explode"),
        "<answer>C1, C2, C3, C4</answer>",
    ]})
    roles = [m["role"] for m in t.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "tool", "tool", "assistant"]
    assistant = t.messages[2]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["no_such_tool", "get_item_info", "explode"]
    assert "<tool_call>{\"name\"" in assistant["content"]  # the unparseable block stays as text
    outputs = [m["content"] for m in t.messages[3:7]]
    assert outputs[0].startswith("Error: unknown tool 'no_such_tool'")
    assert outputs[1] == "Error: unknown candidate label 'C9'"
    assert outputs[2].startswith("Error: the tool failed: RuntimeError: boom")
    assert outputs[3].startswith("Error: the tool call is not valid JSON")
    assert "tool_call_id" not in t.messages[6]
    kinds = [r.error_kind for r in t.tool_calls]
    assert kinds == ["unknown_tool", "bad_arguments", TOOL_EXCEPTION, "malformed_json"]
    assert (t.n_tool_calls, t.n_invalid_calls) == (4, 4)
    assert t.valid and t.finish == "answer" and t.n_parse_issues >= 2


def test_turn_budget_forces_a_final_answer():
    backend, (t,) = run(
        {"u1": [ANALYSIS + call("get_item_info", label="C1"), ANALYSIS + call("get_item_info", label="C2"),
                "<answer>C3, C1, C2, C4</answer>"]},
        max_turns=2,
    )
    assert backend.batches == [1, 1, 1]
    assert t.messages[-2]["content"] == FINAL_REQUEST
    assert t.finish == "forced_answer" and t.valid and t.n_turns == 3 and t.n_tool_calls == 2


def test_fallback_to_candidate_order_when_no_answer_comes():
    _, (t,) = run({"u1": [ANALYSIS + call("get_item_info", label="C1")] * 5}, max_turns=2)
    assert t.n_turns == 3 and t.finish == "fallback" and not t.valid
    assert t.final_ranking == ["u1-i1", "u1-i2", "u1-i3", "u1-i4"] and "no_answer" in t.reasons
    assert t.n_tool_calls == 2  # calls in the forced turn are not executed
    assert t.metrics["ndcg@1"] == 0.0 and t.metrics["hr@5"] == 1.0


def test_no_action_on_the_last_turn_gets_only_the_final_request():
    _, (t,) = run({"u1": ["Analysis: hmm.\nPlan: wait.", "<answer>C1, C2, C3, C4</answer>"]}, max_turns=1)
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t.messages[3]["content"] == FINAL_REQUEST
    assert t.finish == "forced_answer" and t.valid and t.n_tool_calls == 0
    with pytest.raises(ValueError):
        AgentConfig(max_turns=0)


def test_tool_call_budget_refuses_extra_calls():
    _, (t,) = run(
        {"u1": [ANALYSIS + call("get_item_info", label="C1") + call("get_item_info", label="C2")
                + call("get_item_info", label="C3"), "<answer>C2, C1</answer>"]},
        max_tool_calls=2,
    )
    assert [r.error_kind for r in t.tool_calls] == [None, None, BUDGET_EXHAUSTED]
    assert t.messages[5]["content"].startswith("Error: the tool-call budget is used up")
    assert t.n_tool_calls == 2 and t.n_invalid_calls == 0
    assert t.finish == "forced_answer" and not t.valid and t.reasons == ["partial_answer:2"] and t.repaired
    assert t.final_ranking == ["u1-i2", "u1-i1", "u1-i3", "u1-i4"]


def test_no_action_gets_a_nudge_and_long_outputs_are_cut():
    _, (t,) = run(
        {"u1": ["Analysis: thinking.\nPlan: think more.", ANALYSIS + call("dump"), "<answer>C2, C2, C7, C1, C3, C4</answer>"]},
        max_observation_chars=100,
    )
    assert t.messages[3]["content"] == no_action_nudge(LABELS)["content"]
    dump = t.messages[5]
    assert dump["role"] == "tool" and len(dump["content"]) < 200 and "4900 more characters" in dump["content"]
    assert t.tool_calls[0].output_chars == len(dump["content"])
    assert not t.valid and set(t.reasons) == {"duplicate_labels:1", "unknown_labels:C7"}
    assert t.final_labels == ["C2", "C1", "C3", "C4"]


def test_backend_error_and_empty_answer_fall_back():
    backend, (err, empty) = run({
        "u1": [Generation("", finish_reason="error", error="HTTP 500")],
        "u2": ["<answer>the first one</answer>", "<answer>still none</answer>"],
    })
    assert err.finish == "fallback" and err.reasons == ["backend_error: HTTP 500"] and not err.valid
    # an empty answer is asked for once more; without a label head the ranking is the fallback, marked
    assert empty.messages[3]["content"] == FINAL_REQUEST and empty.n_turns == 2
    assert empty.finish == "fallback" and empty.reasons == ["empty_answer", "empty_answer", "no_answer"]
    assert empty.final_ranking == ["u2-i1", "u2-i2", "u2-i3", "u2-i4"] and not empty.valid and not empty.repaired


def test_trajectory_json_round_trip_and_mapping_tasks():
    row = {"task_id": "ml-1m/eval/7", "dataset": "ml-1m", "split": "eval", "group": "dense", "user_id": 7,
           "target_item_id": "7-i1", "candidate_item_ids": ["7-i1", "7-i2", "7-i3", "7-i4"], "target_position": 0,
           "history_lines": ["Heat (1995)"]}
    backend = ScriptedBackend({"7": [ANALYSIS + call("get_item_info", label="C1"), "<answer>C1, C2, C3, C4</answer>"]})
    (t,) = run_agent([row], backend, FakeToolbox, AgentConfig(producer="teacher-x"))
    assert t.producer == "teacher-x" and t.user_id == "7" and t.metrics["ndcg@1"] == 1.0
    line = t.to_json()
    back = Trajectory.from_json(line)
    assert back == t and json.loads(line)["tool_calls"][0]["name"] == "get_item_info"


@pytest.mark.slow
def test_trajectory_renders_with_the_qwen_tool_template(prepared_base_model):
    path, _ = prepared_base_model
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )

    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(path))
    _, (t,) = run({"u1": [ANALYSIS + call("get_item_info", label="C2") + "<tool_call>{bad}</tool_call>",
                          "<answer>C2, C1, C3, C4</answer>"]})
    text = tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False)
    assert '"name": "get_item_info"' in text.split("\n</tools>")[0]  # schemas in the system turn
    assert '<tool_call>\n{"name": "get_item_info", "arguments": {"label": "C2"}}\n</tool_call>' in text
    assert "<tool_response>\nC2: Movie u1-i2 | Drama\n</tool_response>" in text
    assert "<tool_call>{bad}</tool_call>" in text
    assert text.count("<|im_start|>assistant") == 2


def test_repaired_answers_are_counted_in_every_summary():
    from recthinker_dagster.evaluation.agents import agent_summary, trajectories_per_task
    from recthinker_dagster.training.validation import summarize_trajectories

    _, trajectories = run({
        "u1": ["<answer>C2, C1, C3, C4</answer>"],  # clean
        "u2": ["<answer>C2, C2, C9</answer>"],  # repaired: duplicate and unknown dropped, C1, C3, C4 appended
        "u3": ["Analysis: no.", "Analysis: still no."],  # no answer and no head: the fallback
    }, max_turns=1)
    clean, repaired, fallback = trajectories
    assert (clean.valid, clean.repaired) == (True, False)
    assert (repaired.valid, repaired.repaired, repaired.final_labels) == (False, True, ["C2", "C1", "C3", "C4"])
    assert (fallback.valid, fallback.repaired, fallback.finish) == (False, False, "fallback")
    assert Trajectory.from_json(repaired.to_json()).repaired
    figures = agent_summary(trajectories_per_task(trajectories))
    assert figures["repaired_answer_rate"] == pytest.approx(1 / 3)
    assert figures["invalid_answer_rate"] == pytest.approx(2 / 3) and figures["forced_head_rate"] == 0.0
    assert summarize_trajectories(trajectories)["repaired_rate"] == pytest.approx(round(1 / 3, 4))
    assert trajectories_per_task(trajectories)["finish"].to_list() == ["answer", "answer", "fallback"]
