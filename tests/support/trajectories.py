"""Real trajectories for the training tests: a scripted backend driving the real tools on ML-1M.

``ScriptedInvestigator`` writes Analysis/Plan text and real tool calls: turn 1 asks for the
user profile and the BPR-MF scores of every candidate, turn 2 answers in the order of
the score table it read back from the tool output. ``real_world()`` builds the tool indexes once per
test session (about 12 s); ``real_trajectories()`` runs the agent loop over them.
"""

from __future__ import annotations

import functools
import json
import re
from types import SimpleNamespace

import polars as pl

from recthinker_dagster.agent import (
    AgentConfig,
    AgentTask,
    Generation,
    SamplingParams,
    run_agent,
)
from recthinker_dagster.tools.signals import score_table_labels
from tests.support.paths import SHARED_DATA, require_shared

PROTOCOL = {"n_eval_users_per_group": 5, "n_valid_users_per_group": 5, "n_train_users_per_group": 20}


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


class ScriptedInvestigator:
    """A fake LLM backend with canned Analysis/Plan texts and real tool calls."""

    name = "scripted-investigator"

    def generate(self, conversations, tools, params: SamplingParams) -> list[Generation]:
        return [Generation(self.reply(messages), 500, 60, 0.01, "stop") for messages in conversations]

    def reply(self, messages: list[dict]) -> str:
        labels = re.findall(r"^([A-Z]\d*): ", messages[1]["content"], re.MULTILINE)
        scores = [m for m in messages if m["role"] == "tool" and m.get("name") == "score_candidates"]
        if not scores:
            return (
                "Analysis: I only see the recent history; the user's broader taste and how the "
                "candidates fit it are unknown.\nPlan: read the user profile and score every "
                "candidate with the collaborative model.\n"
                + call("get_user_profile") + "\n" + call("score_candidates", weights={"bprmf": 1.0})
            )
        ranked = score_table_labels(scores[-1]["content"])
        ranked += [label for label in labels if label not in ranked]
        return (
            "Analysis: the profile and the collaborative scores agree on the top candidates.\n"
            f"Plan: rank by the scores, best first.\n<answer>{', '.join(ranked)}</answer>"
        )


@functools.lru_cache(maxsize=1)
def real_world() -> SimpleNamespace:
    """ML-1M tasks and tool indexes (built once per session)."""
    from recthinker_dagster.data.sources import load_dataset
    from recthinker_dagster.protocol import build_task_splits, protocol_config_for
    from recthinker_dagster.tools import build_all, index_interactions

    require_shared("ml-1m")
    data, _ = load_dataset("ml-1m", SHARED_DATA, allow_download=False)
    splits = build_task_splits(data.interactions, protocol_config_for("ml-1m", **PROTOCOL), "ml-1m")
    valid = splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(index_interactions(splits.train_interactions, splits.tasks), data.items, data.users,
                        valid, {"bpr_epochs": 1, "sasrec_train_windows": 0})
    return SimpleNamespace(tasks=splits.tasks, indexes=indexes)


def agent_tasks(split: str, n: int | None = None) -> list[AgentTask]:
    world = real_world()
    rows = world.tasks.filter(pl.col("split") == split).rows(named=True)[:n]
    catalog = world.indexes.catalog
    return [AgentTask.from_mapping(row, [catalog.line(i) for i in row["history_item_ids"][-10:]]) for row in rows]


def toolbox_factory(task: AgentTask):
    from recthinker_dagster.tools import Toolbox

    world = real_world()
    row = world.tasks.filter(pl.col("task_id") == task.task_id).row(0, named=True)
    # the task's candidate order, which a relabelled rollout shuffles (training/grpo.py, shown_task)
    return Toolbox(world.indexes, {**row, "candidate_item_ids": list(task.candidate_item_ids)})


@functools.lru_cache(maxsize=1)
def synthetic_world() -> SimpleNamespace:
    """Tasks and tool indexes of a small synthetic dataset: light enough to build in every
    process of a data-parallel test (ML-1M's take gigabytes per process)."""
    from recthinker_dagster.data.synthetic import generate_synthetic
    from recthinker_dagster.protocol import build_task_splits, protocol_config_for
    from recthinker_dagster.tools import build_all, index_interactions

    data = generate_synthetic(n_users=120, n_items=150, seed=3)
    splits = build_task_splits(data.interactions, protocol_config_for("synthetic", **PROTOCOL), "synthetic")
    valid = splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(index_interactions(splits.train_interactions, splits.tasks), data.items, data.users,
                        valid, {"bpr_epochs": 1, "sasrec_train_windows": 0})
    return SimpleNamespace(tasks=splits.tasks, indexes=indexes)


def rl_task_source(split: str, n: int) -> tuple[list[AgentTask], object]:
    """GRPO's tasks (synthetic) and toolbox factory, rebuilt in each data-parallel process (a ``TaskSource``)."""
    from recthinker_dagster.tools import Toolbox

    world = synthetic_world()
    rows = world.tasks.filter(pl.col("split") == split).rows(named=True)[:n]
    catalog = world.indexes.catalog
    by_id = {row["task_id"]: row for row in rows}
    tasks = [AgentTask.from_mapping(row, [catalog.line(i) for i in row["history_item_ids"][-10:]]) for row in rows]
    return tasks, lambda task: Toolbox(world.indexes, by_id[task.task_id])


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A test-only GRPO reward with variance inside every group, whatever the model writes
    (an untrained model's ranking rewards are often all equal): shorter completions earn more."""
    return [-len(c[0]["content"] if isinstance(c, list) else c) / 100.0 for c in completions]


@functools.lru_cache(maxsize=4)
def real_trajectories(split: str = "train", n: int | None = None) -> tuple:
    """Trajectories of the scripted investigator on real tasks (cached; copy before mutating)."""
    config = AgentConfig(max_turns=4, max_tool_calls=4)
    return tuple(run_agent(agent_tasks(split, n), ScriptedInvestigator(), toolbox_factory, config))
