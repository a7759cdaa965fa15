"""A fake toolbox and hand-made agent tasks for the agent-loop and backend tests (no data, no model)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from recthinker_dagster.agent import AgentTask


@dataclass
class FakeResult:
    ok: bool
    output: str
    error_kind: str | None = None


class FakeToolbox:
    """Same interface as the real toolbox, bound to one task."""

    def __init__(self, task: AgentTask):
        self.labels = {f"C{i}": item for i, item in enumerate(task.candidate_item_ids, start=1)}
        self.calls: list[tuple[str, dict]] = []

    def schemas(self):
        return [
            {"type": "function", "function": {
                "name": "get_item_info", "description": "Details of one candidate.",
                "parameters": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}}},
            {"type": "function", "function": {
                "name": "explode", "description": "Always fails.", "parameters": {"type": "object", "properties": {}}}},
            {"type": "function", "function": {
                "name": "dump", "description": "Returns a lot.", "parameters": {"type": "object", "properties": {}}}},
        ]

    def call(self, name, arguments):
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        self.calls.append((name, arguments))
        if name == "explode":
            raise RuntimeError("boom")
        if name == "dump":
            return FakeResult(True, "x" * 5000)
        label = arguments.get("label")
        if label not in self.labels:
            return FakeResult(False, f"Error: unknown candidate label {label!r}", "bad_arguments")
        return FakeResult(True, f"{label}: Movie {self.labels[label]} | Drama")

    def candidate_lines(self):
        return [f"{label}: Movie {item} | Drama" for label, item in self.labels.items()]


def task(user: str, target_index: int = 1) -> AgentTask:
    """An ML-1M-like eval task of ``user``: candidates C1..C4, the target at ``target_index``."""
    items = [f"{user}-i{k}" for k in range(1, 5)]  # C1..C4
    return AgentTask(
        task_id=f"ml-1m/eval/{user}", user_id=user, target_item_id=items[target_index],
        candidate_item_ids=items, history_lines=["Heat (1995) | Action", "Casino (1995) | Drama"],
        group="sparse", split="eval", dataset="ml-1m",
    )
