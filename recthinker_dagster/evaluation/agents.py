"""Per-task rows for agents (from trajectories), in the same shape as the baselines' rows,
plus the agent-only figures: tool calls, validity, tokens and latency."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import polars as pl

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.data.schema import FrameSchema
from recthinker_dagster.evaluation.baselines import METRICS

AGENT_COLUMNS = {
    "n_tool_calls": pl.Int64,
    "n_invalid_calls": pl.Int64,
    "valid": pl.Boolean,
    "repaired": pl.Boolean,  # the answer took the parser's repair (never valid)
    "finish": pl.Utf8,  # answer, forced_answer, forced_head or fallback
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "latency_s": pl.Float64,
}


def trajectories_per_task(trajectories: Iterable[Trajectory]) -> pl.DataFrame:
    rows = [
        {
            "task_id": t.task_id,
            "split": t.split,
            "group": t.group,
            "user_id": t.user_id,
            "ranking": list(t.final_ranking),
            "target_item_id": t.target_item_id,
            **{m: float(t.metrics.get(m, 0.0)) for m in METRICS},
            **{c: getattr(t, c) for c in AGENT_COLUMNS},
        }
        for t in trajectories
    ]
    schema: FrameSchema = {
        "task_id": pl.Utf8, "split": pl.Utf8, "group": pl.Utf8, "user_id": pl.Utf8,
        "ranking": pl.List(pl.Utf8), "target_item_id": pl.Utf8,
        **{m: pl.Float64 for m in METRICS}, **AGENT_COLUMNS,
    }
    return pl.DataFrame(rows, schema=schema)


def agent_summary(per_task: pl.DataFrame) -> dict[str, float]:
    """Tool calls per task, invalid-answer, repaired-answer and forced-head rates, tokens and latency per task."""
    if per_task.is_empty() or "n_tool_calls" not in per_task.columns:
        return {}
    return {
        "tool_calls_per_task": _mean(per_task["n_tool_calls"]),
        "invalid_answer_rate": 1.0 - _mean(per_task["valid"].cast(pl.Float64)),
        "repaired_answer_rate": _mean(per_task["repaired"].cast(pl.Float64)),
        "forced_head_rate": _mean((per_task["finish"] == "forced_head").cast(pl.Float64)),
        "tokens_per_task": _mean(per_task["prompt_tokens"] + per_task["completion_tokens"]),
        "latency_s_per_task": _mean(per_task["latency_s"]),
    }


def _mean(column: pl.Series) -> float:
    return float(cast(float, column.cast(pl.Float64).mean()))
