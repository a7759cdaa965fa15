"""Resumable trajectory generation: complete runs, interruptions, truncated and corrupt files.

Uses the scripted teacher on a small synthetic dataset (indexes build in about a second):
resumption is about the file, not about the data.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.agent import Trajectory
from recthinker_dagster.agent.generation import generate_trajectories, read_records
from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.teachers import PRODUCER, ScriptedTeacher
from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.tools import Toolbox, build_all, index_interactions

PROTOCOL = {"n_eval_users_per_group": 5, "n_valid_users_per_group": 5, "n_train_users_per_group": 12}
K = 2


@pytest.fixture(scope="module")
def world():
    data = generate_synthetic(n_users=200, n_items=300, seed=3)
    splits = build_task_splits(data.interactions, protocol_config_for("synthetic", **PROTOCOL), "synthetic")
    visible = index_interactions(splits.train_interactions, splits.tasks)
    indexes = build_all(visible, data.items, data.users, None, {"bpr_epochs": 2, "sasrec_train_windows": 500})
    frame = splits.tasks.filter(pl.col("split") != "eval")
    return SimpleNamespace(tasks=agent_tasks(frame, indexes), factory=Toolboxes(indexes), frame=frame, indexes=indexes)


def test_an_agent_task_carries_what_its_toolbox_needs(world):
    """One task type: the toolbox of an AgentTask is the toolbox of its task-table row."""
    for task, row in zip(world.tasks[:5], world.frame.iter_rows(named=True)):
        assert task.history_item_ids == list(row["history_item_ids"]) and task.target_item_id not in task.history_item_ids
        from_task, from_row = world.factory(task), Toolbox(world.indexes, row)
        assert from_task.history == from_row.history and from_task.candidates == from_row.candidates
        assert from_task.call("search_user_history", {}).output == from_row.call("search_user_history", {}).output


class CountingTeacher:
    """The scripted teacher, recording every (task_id, sample_index) it is asked for."""

    def __init__(self):
        self.inner = ScriptedTeacher()
        self.name = self.inner.name
        self.asked: list[tuple[str, int]] = []

    def run(self, tasks, toolbox_factory, config=None, *, sample_index=0, seed=0):
        self.asked += [(task.task_id, sample_index) for task in tasks]
        return self.inner.run(tasks, toolbox_factory, config, sample_index=sample_index, seed=seed)


def _run(world, path, teacher=None, **kwargs):
    kwargs.setdefault("batch_size", 8)
    return generate_trajectories(world.tasks, teacher or CountingTeacher(), path, toolbox_factory=world.factory,
                                 samples_per_task=K, seed=5, **kwargs)


def _stable(path) -> list[dict]:
    """The file's records without wall-clock fields."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("latency_s")
    return records


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "trajectories.jsonl"
    teacher = CountingTeacher()
    summary = _run(world, path, teacher)
    return SimpleNamespace(path=path, summary=summary, records=_stable(path), asked=teacher.asked)


def test_a_full_run_writes_every_task_and_sample_once(world, reference):
    n = len(world.tasks)
    records = reference.records
    assert len(records) == n * K == reference.summary.n_records == reference.summary.n_generated
    assert reference.summary.n_resumed == 0 and reference.summary.dropped_lines == 0
    assert [(r["task_id"], r["sample_index"]) for r in records] == \
        [(t.task_id, k) for k in range(K) for t in world.tasks]  # the fixed order: sample 0 first
    assert all(r["teacher"] == PRODUCER == r["producer"] and r["generation_seed"] == 5 for r in records)
    trajectories = [Trajectory.from_json(line) for line in reference.path.read_text().splitlines()]
    assert all(t.valid for t in trajectories)
    by_sample = {k: [t for t, r in zip(trajectories, records) if r["sample_index"] == k] for k in range(K)}
    differing = sum(a.messages != b.messages for a, b in zip(by_sample[0], by_sample[1]))
    assert differing >= 0.8 * n  # samples of a task differ


def test_the_summary_matches_the_file(reference):
    summary, records = reference.summary, reference.records
    assert summary.valid_rate == 1.0 and summary.finish == {"answer": len(records)} and summary.repaired_rate == 0.0
    names = [call["name"] for r in records for call in r["tool_calls"]]
    assert summary.tool_calls == {name: names.count(name) for name in set(names)}
    assert summary.tool_calls_per_trajectory == pytest.approx(len(names) / len(records), abs=1e-3)
    for key, stats in summary.by_group.items():
        split, group = key.split("/")
        rows = [r for r in records if (r["split"], r["group"]) == (split, group)]
        assert stats["n"] == len(rows)
        assert stats["ndcg@10"] == pytest.approx(np.mean([r["metrics"]["ndcg@10"] for r in rows]), abs=1e-4)
    assert summary.by_teacher[PRODUCER]["n"] == len(records)
    assert summary.trajectories_per_min > 0 and summary.seconds > 0
    assert json.loads(json.dumps(summary.to_dict()))["n_records"] == len(records)


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_without_redoing_anything(world, reference, tmp_path):
    path = tmp_path / "out.jsonl"
    calls = []

    def stop_after_three(done, total):
        calls.append((done, total))
        if len(calls) == 3:
            raise Interrupt

    first = CountingTeacher()
    with pytest.raises(Interrupt):
        _run(world, path, first, progress=stop_after_three)
    written, _ = read_records(path)
    assert len(written) == calls[-1][0] == 3 * 8 and calls[-1][1] == len(reference.records)

    second = CountingTeacher()
    summary = _run(world, path, second)
    assert summary.n_resumed == 24 and summary.n_generated == len(reference.records) - 24
    assert not set(first.asked) & set(second.asked)  # nothing was done twice
    assert sorted(first.asked + second.asked) == sorted(reference.asked)
    assert _stable(path) == reference.records  # same records, same order as without the interruption

    third = CountingTeacher()
    again = _run(world, path, third)
    assert third.asked == [] and again.n_generated == 0 and again.n_records == len(reference.records)
    assert again.by_group == reference.summary.by_group


def test_a_truncated_last_line_is_dropped_and_redone(world, reference, tmp_path):
    path = tmp_path / "out.jsonl"
    lines = reference.path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    teacher = CountingTeacher()
    summary = _run(world, path, teacher)
    last = reference.records[-1]
    assert teacher.asked == [(last["task_id"], last["sample_index"])]
    assert summary.dropped_lines == 1 and summary.n_resumed == len(lines) - 1 and summary.n_generated == 1
    assert _stable(path) == reference.records


def test_corrupt_lines_are_dropped_and_the_file_stays_valid(world, reference, tmp_path):
    path = tmp_path / "out.jsonl"
    lines = reference.path.read_text().splitlines(keepends=True)
    lines[3] = '{"task_id": "broken", \n'
    path.write_text("".join(lines[:10]) + "\n")  # plus an empty line
    teacher = CountingTeacher()
    progress = SimpleNamespace(n=0)
    progress.update = lambda n: setattr(progress, "n", progress.n + n)  # tqdm-like
    summary = _run(world, path, teacher, progress=progress)
    assert summary.dropped_lines == 1 and summary.n_resumed == 9
    assert progress.n == summary.n_generated == len(reference.records) - 9
    broken = reference.records[3]
    assert (broken["task_id"], broken["sample_index"]) in teacher.asked
    records = _stable(path)
    def key(record):
        return record["task_id"], record["sample_index"]

    assert sorted(records, key=key) == sorted(reference.records, key=key)
    assert all(line.strip() for line in path.read_text().splitlines())


def test_bad_arguments(world, tmp_path):
    with pytest.raises(ValueError):
        generate_trajectories(world.tasks + world.tasks[:1], ScriptedTeacher(), tmp_path / "x.jsonl",
                              toolbox_factory=world.factory)
    with pytest.raises(ValueError):
        generate_trajectories(world.tasks, ScriptedTeacher(), tmp_path / "x.jsonl", toolbox_factory=world.factory,
                              samples_per_task=0)
