"""The paper's comparison on one dataset: per group, the best agent against the strongest
baseline, with the relative improvement and a paired significance test, and the cost per task.

    rows = headline_comparisons(rankings.filter(pl.col("in_llm_subset")), agents=LLM_SYSTEMS,
                                baselines=CLASSICAL_SYSTEMS, reference="teacher")
    comparisons_markdown(rows)    # | group | comparison | system | NDCG@10 | ... | p |
    cost_markdown(rankings)       # | system | tasks | tokens | tool calls | seconds | valid answers |

"Best" and "strongest" are chosen per group by mean NDCG@10 on the compared tasks, as the paper
reports its table. Choosing the best of several agents on the same tasks favours the agents a
little; choosing the strongest of several baselines favours the baselines, and the p-value of
each row is for that one pair. The test pairs the two systems task by task
(:func:`recthinker_dagster.metrics.paired_bootstrap_test`, one-sided: "a beats b").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from recthinker_dagster.metrics import PairedTest, paired_bootstrap_test

METRIC = "ndcg@10"
COST_COLUMNS = ("n_tool_calls", "prompt_tokens", "completion_tokens", "latency_s", "valid")


@dataclass(frozen=True)
class Comparison:
    """``system`` against ``other`` on the same tasks of one group."""

    group: str
    label: str  # e.g. "best agent vs strongest baseline"
    system: str
    other: str
    value: float  # mean METRIC of system
    other_value: float
    test: PairedTest

    @property
    def relative(self) -> float:
        """(system - other) / other, the paper's relative improvement (NaN when other is 0)."""
        return (self.value - self.other_value) / self.other_value if self.other_value else float("nan")


def best_system(rows: pl.DataFrame, systems: Sequence[str], metric: str = METRIC) -> str | None:
    """The system of ``systems`` with the highest mean ``metric`` in ``rows`` (first in order on ties)."""
    present = [s for s in systems if s in set(rows["system"].to_list())]
    if not present:
        return None
    means = {s: float(rows.filter(pl.col("system") == s)[metric].mean()) for s in present}  # type: ignore[arg-type]
    return max(present, key=lambda s: (means[s], -present.index(s)))


def compare(rows: pl.DataFrame, group: str, label: str, system: str, other: str, *, metric: str = METRIC,
            n_resamples: int = 10_000, seed: int = 0) -> Comparison:
    """``system`` against ``other`` on the tasks both were scored on (paired by ``task_id``)."""
    paired = (rows.filter(pl.col("system") == system).select("task_id", pl.col(metric).alias("a"))
              .join(rows.filter(pl.col("system") == other).select("task_id", pl.col(metric).alias("b")),
                    on="task_id", how="inner", maintain_order="left"))
    if paired.is_empty():
        raise ValueError(f"{system!r} and {other!r} share no task in group {group!r}: nothing to compare")
    test = paired_bootstrap_test(paired["a"].to_numpy(), paired["b"].to_numpy(), n_resamples=n_resamples, seed=seed)
    return Comparison(group, label, system, other, float(paired["a"].mean()), float(paired["b"].mean()), test)  # type: ignore[arg-type]


def headline_comparisons(rows: pl.DataFrame, *, agents: Sequence[str], baselines: Sequence[str],
                         reference: str | None = None, metric: str = METRIC, n_resamples: int = 10_000,
                         seed: int = 0) -> list[Comparison]:
    """Per group (in row order): the best agent against the strongest baseline, and, when the
    ``reference`` system (the teacher) was scored, the reference against the strongest baseline
    and the best agent against the reference. ``rows``: one row per system and task."""
    found: list[Comparison] = []
    for group in rows["group"].unique(maintain_order=True).to_list():
        part = rows.filter(pl.col("group") == group)
        agent, baseline = best_system(part, agents, metric), best_system(part, baselines, metric)
        has_reference = reference is not None and reference in set(part["system"].to_list())
        pairs = [("best agent vs strongest baseline", agent, baseline)]
        if has_reference:
            pairs += [("teacher vs strongest baseline", reference, baseline), ("best agent vs teacher", agent, reference)]
        for label, system, other in pairs:
            if system is not None and other is not None:
                found.append(compare(part, group, label, system, other, metric=metric,
                                     n_resamples=n_resamples, seed=seed))
    return found


def comparisons_markdown(comparisons: Sequence[Comparison], metric: str = "NDCG@10") -> str:
    """One Markdown table, a row per comparison."""
    lines = [f"Paired one-sided bootstrap test of each pair on the same tasks ({metric}); relative = "
             "(system - other) / other.", "",
             f"| group | comparison | system | {metric} | other | {metric} | relative | difference [95% CI] | p | n |",
             "|---|---|---|---:|---|---:|---:|---|---:|---:|"]
    for c in comparisons:
        t = c.test
        lines.append(f"| {c.group} | {c.label} | {c.system} | {c.value:.3f} | {c.other} | {c.other_value:.3f} | "
                     f"{100 * c.relative:+.1f}% | {t.effect:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}] | "
                     f"{t.p_value:.4f} | {t.n_tasks} |")
    return "\n".join(lines) + "\n"


def cost_markdown(rows: pl.DataFrame) -> str:
    """Tokens, tool calls, seconds and the valid-answer rate per task of every agent system
    (the systems with agent columns); "" when there is none."""
    if not set(COST_COLUMNS) <= set(rows.columns):
        return ""
    agents = rows.filter(pl.col("n_tool_calls").is_not_null())
    if agents.is_empty():
        return ""
    costs = agents.group_by("system", maintain_order=True).agg(
        pl.len().alias("tasks"),
        (pl.col("prompt_tokens") + pl.col("completion_tokens")).mean().alias("tokens"),
        pl.col("n_tool_calls").mean().alias("calls"),
        pl.col("latency_s").mean().alias("seconds"),
        pl.col("valid").cast(pl.Float64).mean().alias("valid"),
    )
    lines = ["| system | tasks | tokens | tool calls | seconds | valid answers |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['tasks']} | {r['tokens']:.0f} | {r['calls']:.2f} | {r['seconds']:.2f} | "
              f"{r['valid']:.2f} |" for r in costs.iter_rows(named=True)]
    return "\n".join(lines) + "\n"
