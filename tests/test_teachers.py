"""Teachers: the scripted investigator on real ML-1M data, and the LLM teacher on fake backends.

The ML-1M world is users 1-800 (real data), 100 train and 50 valid users per group, BPR-MF
trained for 3 epochs and SASRec on 2,000 windows: built once per module in a few seconds.
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
from recthinker_dagster.agent.teachers import PRODUCER, LLMTeacher, ScriptedTeacher, Teacher, fusion
from recthinker_dagster.data.sources import load_dataset
from recthinker_dagster.evaluation.baselines import evaluate_recommender
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.tools import TOOL_NAMES, Toolbox, ToolResult, build_all, index_interactions
from recthinker_dagster.tools.signals import score_table_labels
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
    indexes = build_all(visible, data.items, data.users, valid, {"bpr_epochs": 3, "sasrec_train_windows": 2000})
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


def test_history_lines_are_the_latest_items_in_the_history_tool_format_without_dates(world):
    row = world.frame.row(0, named=True)
    lines = history_lines(Toolbox(world.indexes, row), 10)
    assert len(lines) == 10 and [line.split(" ")[1].rstrip(":") for line in lines] == row["history_item_ids"][-10:]
    assert re.match(r"^\d/5 \d+: .+\(\d{4}\)", lines[0])
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
        assert trajectory.n_tool_calls == len(trajectory.tool_calls) == 2
        assert all(record.ok for record in trajectory.tool_calls)
    assert checked >= 80


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


def test_the_answer_is_the_order_of_the_last_score_table(world):
    for _task, trajectory in _sample(world):
        tables = [m["content"] for m in trajectory.messages if m["role"] == "tool" and m["name"] == "score_candidates"]
        assert tables and score_table_labels(tables[-1]) == trajectory.final_labels


def test_the_weights_follow_the_history_regime_the_profile_shows(world):
    seen = set()
    for task, trajectory in zip(world.tasks, world.trajectories):
        profile = next(m["content"] for m in trajectory.messages if m["role"] == "tool")
        n_items = int(re.search(r"\((\d+) items in history\)", profile).group(1))
        assert n_items == len(task.history_item_ids)
        regime = fusion.regime(n_items)
        asked = next(c.arguments["weights"] for c in trajectory.tool_calls if c.name == "score_candidates")
        expected = {k: round(w, 1) for k, w in fusion.weights_for("ml-1m", regime).items() if round(w, 1)}
        assert asked == expected
        assert f"a {regime} one" in trajectory.messages[4]["content"]
        seen.add(regime)
    assert seen == {"short", "long"}


def test_it_beats_popularity_on_train_and_valid_tasks(world):
    popularity = evaluate_recommender(Popularity().fit(world.visible), world.frame)
    teacher = {t.task_id: t.metrics for t in world.trajectories}
    report = []
    for (split, group), rows in popularity.group_by("split", "group"):
        ours = [teacher[task_id]["ndcg@10"] for task_id in rows["task_id"]]
        report.append((split, group, float(np.mean(ours)), float(rows["ndcg@10"].mean())))
    assert len(report) == 4 and len(world.trajectories) >= 300
    for _split, _group, ours, theirs in report:
        assert ours > theirs + 0.03, report


@pytest.mark.parametrize("max_turns,max_tool_calls", [(6, 8), (3, 4), (2, 3), (2, 1), (1, 5), (4, 0)])
def test_budgets_are_respected_and_the_answer_is_never_forced(world, max_turns, max_tool_calls):
    config = AgentConfig(max_turns=max_turns, max_tool_calls=max_tool_calls)
    tasks = world.tasks[::40]
    for trajectory in ScriptedTeacher(config).run(tasks, world.factory):
        assert trajectory.n_turns <= max_turns and trajectory.n_tool_calls <= max(max_tool_calls - 1, 0)
        assert trajectory.finish == "answer" and trajectory.valid and trajectory.n_parse_issues == 0
        assert f"at most {max_turns} turns and {max_tool_calls} tool calls" in trajectory.messages[0]["content"]
        if max_tool_calls >= 3 and max_turns >= 2:
            assert [call.name for call in trajectory.tool_calls] == ["get_user_profile", "score_candidates"]


def test_conversations_are_short(world, smollm2_tokenizer):
    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template

    tokenizer = ensure_tool_chat_template(smollm2_tokenizer)
    lengths = [len(tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=True))
               for _, t in _sample(world, 30)]
    assert np.median(lengths) <= 1500 and np.percentile(lengths, 95) <= 2200, lengths


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


def test_signals_missing_from_the_suite_are_left_out_of_the_weights(world):
    bare = dataclasses.replace(world.indexes, sasrec=None)
    trajectories = ScriptedTeacher().run(world.tasks[:5], Toolboxes(bare))
    for trajectory in trajectories:
        weights = next(c.arguments["weights"] for c in trajectory.tool_calls if c.name == "score_candidates")
        assert "sasrec" not in weights and weights and trajectory.valid
        assert all(call.ok for call in trajectory.tool_calls)


class _FailingScores:
    """A toolbox whose scoring tool fails: the teacher must not claim a table it never saw."""

    def __init__(self, box):
        self.box = box

    def __getattr__(self, name):
        return getattr(self.box, name)

    def call(self, name, arguments=None):
        if name == "score_candidates":
            return ToolResult(False, "Error: the model is unavailable", "internal")
        return self.box.call(name, arguments)


def test_a_failed_tool_is_reported_and_its_table_not_claimed(world):
    tasks = world.tasks[:3]
    trajectories = ScriptedTeacher().run(tasks, lambda task: _FailingScores(world.factory(task)))
    for trajectory in trajectories:
        assert trajectory.valid and any(not call.ok for call in trajectory.tool_calls)
        assert "There is no score table to read." in trajectory.messages[-1]["content"]


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


# -- the thinking teacher (think before recommend: RecOne's SFT data) ---------------------------------


def test_the_thinking_teacher_ranks_as_the_investigator_in_one_tool_free_turn(world):
    from recthinker_dagster.agent.teachers.thinking import THINKER, ThinkingTeacher
    from recthinker_dagster.agent.think import THINK_PROMPT, sections_written

    sample = _sample(world, 30)
    tasks, canonical = [t for t, _ in sample], [tr for _, tr in sample]
    thought = ThinkingTeacher().run(tasks, world.factory)
    assert [t.final_ranking for t in thought] == [t.final_ranking for t in canonical]  # the investigator's order
    for trajectory in thought:
        assert trajectory.producer == THINKER and trajectory.valid and trajectory.finish == "answer"
        assert trajectory.n_tool_calls == 0 and [m["role"] for m in trajectory.messages] == ["system", "user", "assistant"]
        assert trajectory.messages[0]["content"].startswith(THINK_PROMPT.split("\n")[0])
        reply = trajectory.messages[-1]["content"]
        assert sections_written(reply) == ("user", "candidates", "match")
        leaders = re.search(r"So (.+) lead\.", reply).group(1).split(", ")
        assert leaders == re.search(r"<answer>(.+)</answer>", reply).group(1).split(", ")[:3]  # it explains its head
    perturbed = ThinkingTeacher().run(tasks, world.factory, sample_index=1, seed=3)
    assert any(a.final_ranking != b.final_ranking for a, b in zip(perturbed, thought))  # samples try other weights


def test_sections_written_needs_each_section_once_in_order_and_not_empty():
    from recthinker_dagster.agent.think import sections_written

    full = "<user>likes horror</user>\n<candidates>G is a slasher</candidates><match>G fits</match><answer>G, A</answer>"
    assert sections_written(full) == ("user", "candidates", "match")
    assert sections_written("<user>likes horror</user><match>G fits</match>") == ("user",)  # candidates missing
    assert sections_written("<candidates>x</candidates><user>y</user>") == ("user",)  # no candidates after the user
    assert sections_written("<user> </user><candidates>x</candidates>") == ()  # empty
    assert sections_written("<user>unclosed<candidates>x</candidates>") == ()


def test_the_teacher_reports_on_validation_slices_like_a_policy(world):
    from recthinker_dagster.training.validation import ValidationSuite, paired_difference, teacher_report

    tasks = [t for t, _ in _sample(world, 20)]
    canonical = [tr for _, tr in _sample(world, 20)]
    report = teacher_report([ValidationSuite("ml-1m", tasks, world.factory)])
    assert report["producer"] == "teacher" and report["overall"]["n_tasks"] == len(tasks)
    assert report["overall"]["ndcg@10"] == pytest.approx(np.mean([t.metrics["ndcg@10"] for t in canonical]), abs=1e-4)
    assert report["overall"]["answered_rate"] == 1.0 and report["by_dataset"]["ml-1m"]["tool_calls_per_task"] == 2.0
    assert paired_difference(report, report) == {"n_tasks": len(tasks), "mean": 0.0, "ci95": [0.0, 0.0]}
    from recthinker_dagster.agent.labels import candidate_labels

    by_id = {t.task_id: t for t in tasks}
    for row in report["per_task"]:  # the target's rank agrees with its NDCG@10, and its label sits there
        task = by_id[row["task_id"]]
        labels = candidate_labels(len(task.candidate_item_ids))
        assert row["ndcg@10"] == pytest.approx(1 / np.log2(row["target_rank"] + 1) if row["target_rank"] <= 10 else 0.0)
        assert sorted(row["labels"]) == sorted(labels)
        assert row["labels"][row["target_rank"] - 1] == labels[task.candidate_item_ids.index(task.target_item_id)]


def test_a_reordered_slice_moves_the_labels_and_the_teacher_still_ranks_the_same_items(world):
    from recthinker_dagster.training.validation import (
        ValidationSuite,
        kendall_tau,
        ranking_agreement,
        teacher_report,
    )

    tasks = [t for t, _ in _sample(world, 20)]
    reordered = [task.reordered(f"order-1|{task.task_id}") for task in tasks]
    assert [t.reordered(f"order-1|{t.task_id}") for t in tasks] == reordered  # the key decides the order
    assert all(sorted(a.candidate_item_ids) == sorted(b.candidate_item_ids) for a, b in zip(tasks, reordered))
    assert sum(a.candidate_item_ids != b.candidate_item_ids for a, b in zip(tasks, reordered)) >= 18
    report = teacher_report([ValidationSuite("ml-1m", tasks, world.factory)])
    again = teacher_report([ValidationSuite("ml-1m", reordered, world.factory)])
    # the toolbox follows the shown order: the same items, under other labels
    moved = sum(a["labels"] != b["labels"] for a, b in zip(report["per_task"], again["per_task"]))
    assert moved >= 18
    agreement = ranking_agreement(again, report)
    assert agreement["n_tasks"] == len(tasks)
    # the teacher ranks by the tools' scores, which break ties by candidate position only
    assert agreement["same_first"] >= 0.9 and agreement["kendall_tau"] >= 0.9
    assert ranking_agreement(report, report) == {"n_tasks": len(tasks), "same_first": 1.0, "same_ranking": 1.0,
                                                 "kendall_tau": 1.0}
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    assert kendall_tau(["a", "b", "c"], ["a", "c", "b"]) == pytest.approx(1 / 3)
