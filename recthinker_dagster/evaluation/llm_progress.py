"""The LLM evaluation's finished chunks, kept on disk so that an interrupted evaluation resumes.

    store = ChunkStore.open(folder, system, key)   # key: what the chunks depend on (a dict)
    done = store.load(start, tasks)                 # the chunk's trajectories, or None
    store.save(start, trajectories)

The LLM systems run in chunks of a few batches (``llm_systems.run_llm_systems``). Each finished
chunk is written as JSON lines to ``<folder>/<system>/<key digest>/<start>.jsonl`` (write, then
rename, so a kill never leaves half a chunk). The key names everything the trajectories depend
on: the policy's files (name, size, modification time), the agent settings, the tasks, and the
inputs the caller adds (the tool indexes). A changed key starts the system afresh and removes its
stale chunks; a chunk that does not read back as the expected tasks is recomputed, with a
warning. The stage removes the folder once its evaluation is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from recthinker_dagster.agent.trajectory import AgentTask, Trajectory

log = logging.getLogger(__name__)
KEY_FILE = "key.json"


def files_fingerprint(folders: Iterable[Path]) -> list[list]:
    """Each file under ``folders`` as ``[folder name/relative path, size, mtime_ns]``: what
    changes when a folder is republished (published folders are swapped in whole, so their files
    are new), without reading a model's weights."""
    rows = []
    for folder in folders:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        for path in files:
            stat = path.stat()
            rows.append([f"{folder.name}/{path.relative_to(folder)}", stat.st_size, stat.st_mtime_ns])
    return rows


def tasks_fingerprint(tasks: Sequence[AgentTask]) -> str:
    text = json.dumps([asdict(task) for task in tasks], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def digest(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ChunkStore:
    """One system's finished chunks under one key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def open(cls, root: Path, system: str, key: Mapping) -> ChunkStore:
        """The store of ``system`` under ``key``; other keys' chunks of the system are stale and removed."""
        system_dir = Path(root) / system.replace("/", "_")
        folder = system_dir / digest(key)
        if system_dir.is_dir():
            for other in system_dir.iterdir():
                if other != folder:
                    log.info("LLM evaluation of %s: removing chunks made under another key (%s)", system, other.name)
                    shutil.rmtree(other, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
        return cls(folder)

    def _path(self, start: int) -> Path:
        return self.folder / f"{start:06d}.jsonl"

    def load(self, start: int, tasks: Sequence[AgentTask]) -> list[Trajectory] | None:
        """The chunk starting at ``start`` when it was finished for exactly ``tasks``, else None."""
        path = self._path(start)
        if not path.is_file():
            return None
        try:
            found = [Trajectory.from_json(line) for line in path.read_text().splitlines() if line.strip()]
        except (ValueError, TypeError) as error:
            log.warning("%s is unreadable (%s): recomputing that chunk", path, error)
            return None
        if [t.task_id for t in found] != [t.task_id for t in tasks]:
            log.warning("%s holds other tasks than expected: recomputing that chunk", path)
            return None
        return found

    def save(self, start: int, trajectories: Sequence[Trajectory]) -> None:
        path = self._path(start)
        partial = path.with_suffix(".partial")
        partial.write_text("".join(t.to_json() + "\n" for t in trajectories))
        partial.replace(path)
