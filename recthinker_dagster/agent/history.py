"""From protocol tasks to agent tasks: the prompt's history lines and a toolbox per task.

    tasks = agent_tasks(splits.tasks, indexes, prompt_history_len=10)
    toolboxes = Toolboxes(indexes)                       # toolbox_factory for run_agent
    trajectories = run_agent(tasks, backend, toolboxes, AgentConfig())

The prompt shows the most recent ``prompt_history_len`` history items, oldest first, in the
history tool's own line format (date, rating, item id, compact catalog line), e.g.
``2000-11-26 4/5 1485: Liar Liar (1997) | Comedy``: the agent can pass those item ids to
the tools (``get_related_items``). Lines come from the toolbox, so they show exactly the
task's ``history_item_ids`` and never its target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import polars as pl

from recthinker_dagster.agent.labels import DEFAULT_LABEL_STYLE
from recthinker_dagster.agent.trajectory import AgentTask
from recthinker_dagster.tools.toolbox import DEFAULT_OUTPUT_BUDGET, Toolbox

DEFAULT_PROMPT_HISTORY = 10


def history_lines(toolbox: Toolbox, limit: int = DEFAULT_PROMPT_HISTORY) -> list[str]:
    """The task user's ``limit`` most recent history items, oldest first, as the history tool
    shows them without the date (``4/5 1221: Godfather: Part II, The (1974) | Drama``): a date
    costs ~10 tokens a line in every prompt, and ``search_user_history`` shows it on request."""
    if limit <= 0:
        return []
    _, lines, _ = toolbox.history_lines("", limit)  # newest first, "- date rating id: line"
    return [line.removeprefix("- ").split(" ", 1)[1] for line in reversed(lines)]


def _rows(tasks: pl.DataFrame | Iterable[Mapping]) -> list[dict]:
    if isinstance(tasks, pl.DataFrame):
        return list(tasks.iter_rows(named=True))
    return [dict(row) for row in tasks]


def agent_task(row: Mapping, indexes, prompt_history_len: int = DEFAULT_PROMPT_HISTORY) -> AgentTask:
    """One task-table row as an :class:`AgentTask` with rendered history lines."""
    return AgentTask.from_mapping(row, history_lines(Toolbox(indexes, row), prompt_history_len))


def agent_tasks(tasks: pl.DataFrame | Iterable[Mapping], indexes,
                prompt_history_len: int = DEFAULT_PROMPT_HISTORY) -> list[AgentTask]:
    """Every row of a tasks table (``TASKS_SCHEMA``) as an :class:`AgentTask`, in order."""
    return [agent_task(row, indexes, prompt_history_len) for row in _rows(tasks)]


class Toolboxes:
    """A ``toolbox_factory`` for the agent loop: the :class:`Toolbox` of an :class:`AgentTask`
    (or of a task-table row) over one dataset's indexes, its candidates labelled in ``label_style``."""

    def __init__(self, indexes, *, output_budget_chars: int = DEFAULT_OUTPUT_BUDGET, label_style: str = DEFAULT_LABEL_STYLE):
        self.indexes = indexes
        self.output_budget_chars = output_budget_chars
        self.label_style = label_style

    def __call__(self, task: AgentTask | Mapping) -> Toolbox:
        return Toolbox(self.indexes, task, output_budget_chars=self.output_budget_chars, label_style=self.label_style)
