"""Resumable generation of teacher trajectories into a JSON-lines file.

    summary = generate_trajectories(tasks, ScriptedTeacher(), Path("out/ml-1m.jsonl"),
                                    toolbox_factory=Toolboxes(indexes),
                                    samples_per_task=2, batch_size=64, seed=0)

Each line is ``Trajectory.to_dict()`` plus ``teacher`` (the teacher's name),
``sample_index`` (0..K-1) and ``generation_seed``; ``Trajectory.from_dict`` reads it back
(extra keys are ignored). Work is done in a fixed order: sample 0 of every task, then
sample 1, ..., in batches of ``batch_size`` tasks, each batch appended as complete lines
and fsynced before ``progress`` is told.

Resuming: on start, the file's complete, parseable lines are kept and their
``(task_id, sample_index)`` pairs are skipped; anything else (a partial last line left by
a kill, a corrupt line) is dropped by rewriting the file atomically (temp file + rename).
Since the scripted teacher's output depends only on (task, sample_index, seed), a resumed
run writes the same records, in the same order, as an uninterrupted one (timings aside).
One file is meant for one teacher.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recthinker_dagster.agent.trajectory import AgentTask

logger = logging.getLogger(__name__)
METRICS = ("ndcg@1", "ndcg@5", "ndcg@10")


@dataclass
class GenerationSummary:
    out_path: str
    teacher: str
    n_tasks: int
    samples_per_task: int
    n_requested: int  # tasks x samples
    n_resumed: int  # already in the file at the start
    n_generated: int  # written by this call
    n_records: int  # requested (task, sample) pairs now in the file
    dropped_lines: int  # partial or corrupt lines removed at the start
    seconds: float
    trajectories_per_min: float  # of this call's generation
    valid_rate: float
    finish: dict[str, int] = field(default_factory=dict)
    tool_calls: dict[str, int] = field(default_factory=dict)  # calls per tool name
    tool_calls_per_trajectory: float = 0.0
    by_teacher: dict[str, dict[str, float]] = field(default_factory=dict)  # producer -> n, mean NDCGs
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)  # "split/group" -> n, mean NDCGs
    repaired_rate: float = 0.0  # answers that took the parser's repair (never valid, never silent)

    def to_dict(self) -> dict:
        return asdict(self)


def read_records(path: Path) -> tuple[list[dict], int]:
    """The complete, valid records of ``path`` and how many lines were not (then removed)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline (empty if none)
    records, bad = [], 0
    for line in complete:
        record = _parse(line)
        if record is None:
            bad += 1 if line.strip() else 0
        else:
            records.append(record)
    bad += 1 if tail.strip() else 0
    if bad or any(not line.strip() for line in complete):
        _rewrite(path, records)
        logger.warning("%s: dropped %d partial or corrupt line(s); kept %d records", path, bad, len(records))
    return records, bad


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("task_id"), str) \
            or not isinstance(record.get("sample_index"), int):
        return None
    return record


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _as_task(task: AgentTask | Mapping) -> AgentTask:
    return task if isinstance(task, AgentTask) else AgentTask.from_mapping(task)


def _notify(progress, done: int, total: int, n: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):  # tqdm and friends
        progress.update(n)
    else:
        progress(done, total)


def generate_trajectories(
    tasks: Iterable[AgentTask | Mapping],
    teacher,
    out_path: Path,
    *,
    toolbox_factory: Callable,
    samples_per_task: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | object | None = None,
) -> GenerationSummary:
    """Write ``samples_per_task`` trajectories per task to ``out_path`` (resuming; see module doc).

    ``teacher`` has ``name`` and ``run(tasks, toolbox_factory, *, sample_index, seed)``;
    ``progress`` is ``callable(done, total)`` or has ``update(n)`` (tqdm), called after each
    batch is on disk."""
    if samples_per_task < 1 or batch_size < 1:
        raise ValueError("samples_per_task and batch_size must be >= 1")
    started = time.perf_counter()
    agent_tasks = [_as_task(task) for task in tasks]
    ids = [task.task_id for task in agent_tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    records, dropped = read_records(out_path)
    wanted = {(task_id, k) for task_id in ids for k in range(samples_per_task)}
    stats = _Stats()
    done: set[tuple[str, int]] = set()
    for record in records:
        key = (record["task_id"], record["sample_index"])
        if key in wanted and key not in done:
            done.add(key)
            stats.add(record)
    n_resumed = len(done)
    total = len(wanted)
    pending = [(k, task) for k in range(samples_per_task) for task in agent_tasks if (task.task_id, k) not in done]
    if n_resumed:
        logger.info("%s: resuming, %d of %d trajectories already done", out_path, n_resumed, total)

    n_generated, gen_seconds = 0, 0.0
    with open(out_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            for k in sorted({k for k, _ in chunk}):  # a chunk may straddle two sample indexes
                batch = [task for kk, task in chunk if kk == k]
                t0 = time.perf_counter()
                trajectories = teacher.run(batch, toolbox_factory, sample_index=k, seed=seed)
                gen_seconds += time.perf_counter() - t0
                lines = []
                for trajectory in trajectories:
                    record = {**trajectory.to_dict(), "teacher": teacher.name, "sample_index": k,
                              "generation_seed": seed}
                    stats.add(record)
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                n_generated += len(lines)
                _notify(progress, n_resumed + n_generated, total, len(lines))
            rate = 60.0 * n_generated / max(gen_seconds, 1e-9)
            logger.info("%s: %d/%d trajectories (%.0f per minute)", out_path, n_resumed + n_generated, total, rate)

    seconds = time.perf_counter() - started
    return stats.summary(
        out_path=str(out_path), teacher=teacher.name, n_tasks=len(agent_tasks), samples_per_task=samples_per_task,
        n_requested=total, n_resumed=n_resumed, n_generated=n_generated, n_records=n_resumed + n_generated,
        dropped_lines=dropped, seconds=round(seconds, 3),
        trajectories_per_min=round(60.0 * n_generated / max(gen_seconds, 1e-9), 1) if n_generated else 0.0,
    )


class _Stats:
    """Running counts and metric lists over records."""

    def __init__(self) -> None:
        self.n = self.valid = self.calls = self.repaired = 0
        self.finish: Counter = Counter()
        self.tools: Counter = Counter()
        self.teacher: dict[str, list[dict]] = {}
        self.group: dict[str, list[dict]] = {}

    def add(self, record: dict) -> None:
        self.n += 1
        self.valid += bool(record.get("valid"))
        self.repaired += bool(record.get("repaired"))
        self.finish[record.get("finish", "?")] += 1
        calls = record.get("tool_calls") or []
        self.calls += len(calls)
        self.tools.update(call.get("name") or "invalid" for call in calls)
        metrics = record.get("metrics") or {}
        self.teacher.setdefault(record.get("producer", "?"), []).append(metrics)
        self.group.setdefault(f"{record.get('split', '?')}/{record.get('group', '?')}", []).append(metrics)

    @staticmethod
    def _means(rows: list[dict]) -> dict[str, float]:
        out: dict[str, float] = {"n": len(rows)}
        for metric in METRICS:
            out[metric] = round(float(np.mean([row.get(metric, 0.0) for row in rows])), 4)
        return out

    def summary(self, **fields) -> GenerationSummary:
        return GenerationSummary(
            **fields,
            valid_rate=round(self.valid / self.n, 4) if self.n else 0.0,
            repaired_rate=round(self.repaired / self.n, 4) if self.n else 0.0,
            finish=dict(self.finish),
            tool_calls=dict(self.tools.most_common()),
            tool_calls_per_trajectory=round(self.calls / self.n, 3) if self.n else 0.0,
            by_teacher={k: self._means(v) for k, v in sorted(self.teacher.items())},
            by_group={k: self._means(v) for k, v in sorted(self.group.items())},
        )
