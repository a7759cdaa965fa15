"""Results tables and plots from ``summarize`` outputs, one summary per system.

A summary has key columns (e.g. ``group``), ``n_tasks``, and per metric ``<m>``,
``<m>_lo`` and ``<m>_hi`` (see ``evaluation.baselines.summarize``). Ranking metrics mean
little without the number of candidates they rank (chance NDCG@10 is 0.45 at 10 candidates,
0.23 at 20), so every table and plot here states it: ``n_candidates`` is a required argument,
read from the tasks with :func:`candidates_per_task`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from recthinker_dagster.evaluation.baselines import METRICS

LABELS = {"ndcg@1": "NDCG@1", "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10", "hr@1": "HR@1",
          "hr@5": "HR@5", "hr@10": "HR@10", "mrr": "MRR"}


def candidates_per_task(tasks: pl.DataFrame) -> int:
    """The one candidate count N of a tasks frame (``candidate_item_ids``); an error if they differ."""
    counts = tasks["candidate_item_ids"].list.len().unique().sort().to_list()
    if len(counts) != 1:
        raise ValueError(f"tasks must all have the same number of candidates, found {counts or 'no tasks'}")
    return int(counts[0])


def candidates_note(n_candidates: int) -> str:
    """``N = 10 candidates per task (the target + 9 sampled negatives)``."""
    return f"N = {n_candidates} candidates per task (the target + {n_candidates - 1} sampled negatives)"


def key_columns(summary: pl.DataFrame) -> list[str]:
    """The grouping columns of a summary (everything that is not a metric or a count)."""
    columns = summary.columns
    return [c for c in columns if c not in ("system", "n_tasks")
            and not c.endswith(("_lo", "_hi")) and f"{c}_lo" not in columns]


def combine_summaries(summaries: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """One frame with a leading ``system`` column, systems in the given order."""
    frames = [s.with_columns(system=pl.lit(name)).select("system", *s.columns)
              for name, s in summaries.items()]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def format_ci(mean: float, lo: float, hi: float) -> str:
    """``0.412 [0.35, 0.47]``."""
    return f"{mean:.3f} [{lo:.2f}, {hi:.2f}]"


def results_table_markdown(summary_frames: Mapping[str, pl.DataFrame],
                           metrics: Sequence[str] = METRICS, *, n_candidates: int) -> str:
    """One Markdown table: a row per system and group, a column per metric (mean [95% CI]),
    under a line that states ``n_candidates``."""
    combined = combine_summaries(summary_frames)
    keys = key_columns(combined)
    metrics = [m for m in metrics if m in combined.columns]
    header = ["system", *keys, "n", *(LABELS.get(m, m) for m in metrics)]
    lines = [f"{candidates_note(n_candidates)}; mean [95% bootstrap CI].", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * (len(keys) + 2))
             + "|" + "|".join(["---:"] * len(metrics)) + "|"]
    for row in combined.iter_rows(named=True):
        cells = [row["system"], *(str(row[k]) for k in keys), str(row.get("n_tasks", ""))]
        cells += [format_ci(row[m], row[f"{m}_lo"], row[f"{m}_hi"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ndcg_by_system(summary: Mapping[str, pl.DataFrame] | pl.DataFrame, path: Path,
                        metric: str = "ndcg@10", title: str | None = None, *, n_candidates: int) -> Path:
    """A PNG bar chart of ``metric`` per system (x axis) and group (bars), with CI error bars.

    ``summary``: ``{system: summary}`` or a combined frame with a ``system`` column. The title
    ends with ``N = <n_candidates> candidates``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frame = combine_summaries(summary) if isinstance(summary, Mapping) else summary
    systems = list(dict.fromkeys(frame["system"].to_list()))
    groups = list(dict.fromkeys(frame["group"].to_list())) if "group" in frame.columns else [None]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(systems) + 1), 3.5))
    for g, group in enumerate(groups):
        part = frame if group is None else frame.filter(pl.col("group") == group)
        lookup = {r["system"]: r for r in part.iter_rows(named=True)}
        means = np.array([lookup[s][metric] if s in lookup else np.nan for s in systems])
        lo = np.array([lookup[s][f"{metric}_lo"] if s in lookup else np.nan for s in systems])
        hi = np.array([lookup[s][f"{metric}_hi"] if s in lookup else np.nan for s in systems])
        x = np.arange(len(systems)) + (g - (len(groups) - 1) / 2) * width
        ax.bar(x, means, width, label=group or metric,
               yerr=np.vstack([means - lo, hi - means]), capsize=3)
    ax.set_xticks(np.arange(len(systems)), systems, rotation=20, ha="right")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_ylim(0, 1)
    ax.set_title(f"{title or LABELS.get(metric, metric) + ' by system (95% bootstrap CI)'}, "
                 f"N = {n_candidates} candidates")
    if groups != [None]:
        ax.legend(title="group")
    return _save_png(fig, path)


def plot_learning_curve(points: Sequence[Mapping], path: Path) -> Path:
    """A PNG of the SFT learning curve (``stages/sft_curve.py``): ranking metrics and behaviour
    rates against the number of training trajectories (log axis; the base model, n = 0, at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [max(int(p["n"]), 1) for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for column in ("ndcg@1", "ndcg@5", "ndcg@10"):
        left.plot(xs, [p["overall"].get(column, 0) for p in points], marker="o", label=LABELS.get(column, column))
    for column, label in (("answered_rate", "own answer"), ("valid_tool_call_rate", ">= 1 valid tool call")):
        right.plot(xs, [p["overall"].get(column, 0) for p in points], marker="o", label=label)
    for ax, title in ((left, "Ranking on the validation tasks"), (right, "Behaviour (share of tasks)")):
        ax.set_xscale("log")
        ax.set_xlabel("SFT trajectories (0 = base model, drawn at 1)")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save_png(fig, path)


def plot_tool_use(per_task: Mapping[str, pl.DataFrame], path: Path, title: str | None = None) -> Path:
    """A PNG histogram of tool calls per task, one bar series per agent system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    agents = {s: f["n_tool_calls"].to_numpy() for s, f in per_task.items() if "n_tool_calls" in f.columns}
    most = int(max((calls.max() for calls in agents.values() if calls.size), default=0))
    bins = np.arange(most + 2)
    width = 0.8 / max(len(agents), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * (most + 2) * max(len(agents), 1) + 1), 3.5))
    for i, (system, calls) in enumerate(agents.items()):
        counts, _ = np.histogram(calls, bins=bins)
        ax.bar(bins[:-1] + (i - (len(agents) - 1) / 2) * width, counts / max(calls.size, 1), width, label=system)
    ax.set_xticks(bins[:-1])
    ax.set_xlabel("tool calls per task")
    ax.set_ylabel("share of tasks")
    ax.set_title(title or "Tool calls per task")
    ax.legend(title="system")
    return _save_png(fig, path)


def _save_png(fig, path: Path) -> Path:
    """Write a finished figure as a PNG (parents created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path
