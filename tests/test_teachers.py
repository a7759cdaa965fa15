"""Teachers: the scripted investigator on real ML-1M data, and the LLM teacher on fake backends.

The ML-1M world is users 1-800 (real data), 100 train and 50 valid users per group, BPR-MF
trained for 3 epochs: built once per module in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.agent import AgentConfig, AgentTask, Generation, SamplingParams, parse_turn
from recthinker_dagster.agent.backends.openai_backend import OpenAICompatibleBackend
from recthinker_dagster.agent.history import Toolboxes, agent_tasks, history_lines
from recthinker_dagster.agent.parser import format_tool_call
from recthinker_dagster.agent.prompts import SYSTEM_PROMPT
from recthinker_dagster.agent.teachers import PRODUCER, LLMTeacher, ScriptedTeacher, Teacher
from recthinker_dagster.data.sources import load_dataset
from recthinker_dagster.evaluation.baselines import evaluate_recommender
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.tools import TOOL_NAMES, Toolbox, ToolResult, build_all, index_interactions
from tests.support.paths import require_shared

PROTOCOL = {"n_eval_users_per_group": 10, "n_valid_users_per_group": 50, "n_train_users_per_group": 100}


@pytest.fixture(scope="module")
def world(shared_data):
    require_shared("ml-1m")
    data, _ = load_dataset("ml-1m", shared_data, allow_download=False)
    keep = pl.col("user_id").cast(pl.Int64) <= 800
    data = dataclasses.replace(data, interactions=data.interactions.filter(keep), users=data.users.filter(keep))
    splits = build_task_splits(data.interactions, protocol_config_for("ml-1m", **PROTOCOL), "ml-1m")
    visible = index_interactions(splits.train_interactions, splits.tasks)
    valid = splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(visible, data.items, data.users, valid, {"bpr_epochs": 3})
    frame = splits.tasks.filter(pl.col("split") != "eval")
    tasks = agent_tasks(frame, indexes)
    factory = Toolboxes(indexes)
    trajectories = ScriptedTeacher().run(tasks, factory)
    return SimpleNamespace(indexes=indexes, frame=frame, tasks=tasks, factory=factory, visible=visible,
                           trajectories=trajectories)


def _sample(world, n=40):
    """A fixed mix of sparse and dense tasks with their canonical trajectories."""
    return [(t, tr) for t, tr in zip(world.tasks, world.trajectories)][:: max(len(world.tasks) // n, 1)]


def _turn_text(message: dict) -> str:
    """An assistant message back as the text a model would write (content, then its calls)."""
    calls = [format_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return "\n".join([message["content"], *calls])


def test_history_lines_are_the_latest_items_in_the_history_tool_format(world):
    row = world.frame.row(0, named=True)
    lines = history_lines(Toolbox(world.indexes, row), 10)
    assert len(lines) == 10 and [line.split(" ")[2].rstrip(":") for line in lines] == row["history_item_ids"][-10:]
    assert re.match(r"^\d{4}-\d\d-\d\d \d/5 \d+: .+\(\d{4}\)", lines[0])
    assert world.tasks[0].history_lines == lines and row["target_item_id"] not in " ".join(lines)


def test_tool_messages_are_the_real_toolbox_outputs(world):
    checked = 0
    for task, trajectory in _sample(world):
        box = world.factory(task)
        messages = trajectory.messages
        for i, message in enumerate(messages):
            for k, call in enumerate(message.get("tool_calls") or []):
                reply = messages[i + 1 + k]
                assert reply["role"] == "tool" and reply["tool_call_id"] == call["id"]
                expected = box.call(call["function"]["name"], call["function"]["arguments"]).output
                assert reply["content"] == expected
                checked += 1
        assert trajectory.n_tool_calls == len(trajectory.tool_calls) >= 3
        assert all(record.ok for record in trajectory.tool_calls)
    assert checked >= 200


def test_every_assistant_turn_parses_and_the_answer_is_complete(world):
    for task, trajectory in zip(world.tasks, world.trajectories):
        labels = dict(world.factory(task).labels)
        assistants = [m for m in trajectory.messages if m["role"] == "assistant"]
        for n, message in enumerate(assistants):
            parsed = parse_turn(_turn_text(message), labels, TOOL_NAMES)
            assert parsed.issues == [], (task.task_id, n, parsed.issues)
            assert parsed.analysis and parsed.plan
            last = n == len(assistants) - 1
            assert parsed.action == ("answer" if last else "tool_calls")
            if not last:
                assert [(c.name, c.arguments) for c in parsed.tool_calls] == \
                    [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert parsed.answer.complete and parsed.answer.ranking == trajectory.final_ranking
        assert trajectory.valid and trajectory.finish == "answer" and trajectory.reasons == []
        assert trajectory.producer == PRODUCER and trajectory.n_parse_issues == 0
        rank = trajectory.final_ranking.index(task.target_item_id)
        assert trajectory.metrics["ndcg@10"] == pytest.approx(1 / np.log2(rank + 2) if rank < 10 else 0.0)


def test_the_text_cites_the_evidence_from_the_tools(world):
    for _task, trajectory in _sample(world, 20):
        messages = trajectory.messages
        outputs = {}
        for i, message in enumerate(messages):
            for k, call in enumerate(message.get("tool_calls") or []):
                outputs.setdefault(call["function"]["name"], []).append(messages[i + 1 + k]["content"])
        text = " ".join(m["content"] for m in messages if m["role"] == "assistant")
        n_items = re.search(r"\((\d+) items in history\)", outputs["get_user_profile"][0]).group(1)
        assert f"Profile: {n_items} items in the history" in text
        top_category = re.search(r"Top categories: (\S+) (\d+)%", outputs["get_user_profile"][0]).groups()
        assert f"{top_category[0]} {top_category[1]}%" in text
        label, score = re.search(r"1\. ([A-Z]): (-?[\d.]+)", outputs["score_candidates"][0]).groups()
        assert re.search(rf"{label} \([^)]*\) {re.escape(score)}", text)  # "Q (Title) 5.41"
        if "find_similar_users" in outputs:
            counted = re.search(r"Candidates in their histories: ([A-Z]) \((\d+) of (\d+)\)",
                                outputs["find_similar_users"][0])
            if counted:
                assert f"{counted.group(1)} ({counted.group(2)} of {counted.group(3)})" in text
        for output in outputs.get("get_related_items", []):
            subject = re.match(r"Items most often consumed together with ([A-Z]) ", output)
            if subject:
                marked = output.count("[in the user's history]")
                phrase = f"{subject.group(1)} co-occurs with " + (f"{marked} of the user's items" if marked else "none")
                assert phrase in text
        title = world.indexes.catalog.title(trajectory.final_ranking[0], 36)
        assert f"{trajectory.final_labels[0]} ({title})" in messages[-1]["content"]


def test_sparse_and_dense_users_get_different_plans(world):
    plans = {"sparse": [], "dense": []}
    for task, trajectory in zip(world.tasks, world.trajectories):
        names = [call.name for call in trajectory.tool_calls]
        latest = world.factory(task).history[-1]
        probe = any(call.name == "get_related_items" and call.arguments["item_id"] == latest
                    for call in trajectory.tool_calls)
        plans[task.group].append(("find_similar_users" in names, probe))
    assert all(similar and not probe for similar, probe in plans["sparse"])
    assert all(probe and not similar for similar, probe in plans["dense"])


def test_it_beats_popularity_on_train_and_valid_tasks(world):
    popularity = evaluate_recommender(Popularity().fit(world.visible), world.frame)
    teacher = {t.task_id: t.metrics for t in world.trajectories}
    report = []
    for (split, group), rows in popularity.group_by("split", "group"):
        ours = [teacher[task_id]["ndcg@10"] for task_id in rows["task_id"]]
        report.append((split, group, float(np.mean(ours)), float(rows["ndcg@10"].mean())))
    assert len(report) == 4 and sum(len(x) for x in [world.trajectories]) >= 300
    for _split, _group, ours, theirs in report:
        assert ours > theirs + 0.03, report
    overall = np.mean([t.metrics["ndcg@10"] for t in world.trajectories])
    assert overall > popularity["ndcg@10"].mean() + 0.08, (overall, report)


@pytest.mark.parametrize("max_turns,max_tool_calls", [(6, 8), (3, 4), (2, 3), (2, 1), (1, 5), (4, 0)])
def test_budgets_are_respected_and_the_answer_is_never_forced(world, max_turns, max_tool_calls):
    config = AgentConfig(max_turns=max_turns, max_tool_calls=max_tool_calls)
    tasks = world.tasks[::40]
    for trajectory in ScriptedTeacher(config).run(tasks, world.factory):
        assert trajectory.n_turns <= max_turns and trajectory.n_tool_calls <= max(max_tool_calls - 1, 0)
        assert trajectory.finish == "answer" and trajectory.valid and trajectory.n_parse_issues == 0
        assert f"at most {max_turns} turns and {max_tool_calls} tool calls" in trajectory.messages[0]["content"]
        if max_tool_calls >= 2 and max_turns >= 2:
            assert "score_candidates" in {call.name for call in trajectory.tool_calls}


def test_samples_differ_and_are_reproducible(world):
    tasks = world.tasks[::10]
    teacher = ScriptedTeacher()
    first = teacher.run(tasks, world.factory, sample_index=1, seed=7)
    again = teacher.run(tasks, world.factory, sample_index=1, seed=7)
    canonical = teacher.run(tasks, world.factory)
    assert [t.messages for t in first] == [t.messages for t in again]
    assert [t.messages for t in canonical] == [t.messages for t in world.trajectories[::10]]
    differs = sum(a.messages != b.messages for a, b in zip(first, canonical))
    assert differs >= 0.8 * len(tasks)
    assert all(t.valid and t.finish == "answer" for t in first)


class _FailingScores:
    """A toolbox whose BPR-MF tool fails: the teacher must not use scores it never saw."""

    def __init__(self, box):
        self.box = box

    def __getattr__(self, name):
        return getattr(self.box, name)

    def call(self, name, arguments=None):
        if name == "score_candidates":
            return ToolResult(False, "Error: the model is unavailable", "internal")
        return self.box.call(name, arguments)


def test_a_failed_tool_is_reported_and_its_evidence_not_used(world):
    tasks = world.tasks[:3]
    trajectories = ScriptedTeacher().run(tasks, lambda task: _FailingScores(world.factory(task)))
    for trajectory in trajectories:
        assert trajectory.valid and any(not call.ok for call in trajectory.tool_calls)
        text = " ".join(m["content"] for m in trajectory.messages if m["role"] == "assistant")
        assert "BPR-MF scores are not available" in text and "BPR-MF ranks" not in text


# ------------------------------------------------------------------------------ LLM teacher
def _task(user="u1"):
    items = [f"{user}-i{k}" for k in range(1, 5)]
    return AgentTask(task_id=f"ml-1m/train/{user}", user_id=user, target_item_id=items[1], candidate_item_ids=items,
                     history_lines=["Heat (1995) | Action"], group="sparse", split="train", dataset="ml-1m")


class _Box:
    def __init__(self, task):
        self.labels = {f"C{k}": item for k, item in enumerate(task.candidate_item_ids, start=1)}

    def schemas(self):
        return [{"type": "function", "function": {"name": "get_item_info", "description": "Item details.",
                                                  "parameters": {"type": "object", "properties": {}}}}]

    def call(self, name, arguments):
        return ToolResult(True, "C2: Heat 2 | Action")

    def candidate_lines(self):
        return [f"{label}: Movie {item}" for label, item in self.labels.items()]


class _FakeLLM:
    """Calls a tool, then answers; records what it was sent."""

    name = "fake-reasoner-32b"

    def __init__(self):
        self.params, self.seen = [], []

    def generate(self, conversations, tools, params):
        self.params.append(params)
        self.seen.append((conversations[0][0]["content"], tools[0]))
        out = []
        for messages in conversations:
            if any(m["role"] == "tool" for m in messages):
                answer = "Analysis: C2 matches Heat.\nPlan: rank.\n<answer>C2, C1, C4, C3</answer>"
                out.append(Generation(answer, 90, 12))
            else:
                out.append(Generation("Analysis: C2 unknown.\nPlan: look it up.\n"
                                      + format_tool_call("get_item_info", {}), 80, 10))
        return out


def test_llm_teacher_runs_the_agent_with_any_backend():
    backend = _FakeLLM()
    teacher = LLMTeacher(backend, AgentConfig(sampling=SamplingParams(seed=3)))
    assert isinstance(teacher, Teacher) and isinstance(ScriptedTeacher(), Teacher)
    (first,) = teacher.run([_task()], _Box)
    assert first.producer == "fake-reasoner-32b" == teacher.name
    assert first.valid and first.finish == "answer" and first.final_labels[0] == "C2"
    assert first.metrics["ndcg@1"] == 1.0 and first.n_tool_calls == 1 and first.completion_tokens == 22
    system, tools = backend.seen[0]
    assert system.startswith(SYSTEM_PROMPT.split("\n")[0]) and "Analysis:" in system
    assert tools[0]["function"]["name"] == "get_item_info"
    teacher.run([_task()], _Box, sample_index=1)
    greedy, sampled = backend.params[0], backend.params[-1]
    assert greedy.seed == 3 and greedy.temperature == 0.0
    assert sampled.seed not in (3, 4) and sampled.temperature == 0.7


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if any(m["role"] == "tool" for m in body["messages"]):
            message = {"role": "assistant", "content": "Analysis: seen.\nPlan: rank.\n<answer>C2, C1, C3, C4</answer>"}
        else:
            message = {"role": "assistant", "content": "Analysis: a\nPlan: b", "tool_calls": [
                {"id": "k", "type": "function", "function": {"name": "get_item_info", "arguments": "{}"}}]}
        data = json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 40, "completion_tokens": 6}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_llm_teacher_over_a_loopback_openai_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.bodies = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        backend = OpenAICompatibleBackend(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "big-teacher", "sk")
        trajectories = LLMTeacher(backend).run([_task("u1"), _task("u2")], _Box)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [t.producer for t in trajectories] == ["big-teacher", "big-teacher"]
    assert all(t.valid and t.n_tool_calls == 1 and t.prompt_tokens == 80 for t in trajectories)
    first = httpd.bodies[0]
    assert first["model"] == "big-teacher" and first["tools"][0]["function"]["name"] == "get_item_info"
