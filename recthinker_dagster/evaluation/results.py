"""The evaluation's report, a function of ``rankings.parquet`` alone.

    rankings = rankings_frame(per_task, subset_ids)          # one row per system and task
    write_rankings(rankings, folder / "rankings.parquet", ReportSettings("ml-1m", 10, 1000, 2026))
    report = build_report(rankings, settings)                # report.text: what results.md holds
    rebuild_report(folder) == (folder / "results.md").read_text()   # `recthinker report` checks this

The settings the tables need beyond the rows (dataset, candidates per task, bootstrap resamples
and seed) travel inside the parquet file as key-value metadata, so every number of
``results.md`` can be recomputed from the saved rankings and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from recthinker_dagster.evaluation.agents import AGENT_COLUMNS
from recthinker_dagster.evaluation.baselines import METRICS, summarize
from recthinker_dagster.evaluation.headline import (
    Comparison,
    comparisons_markdown,
    cost_markdown,
    headline_comparisons,
)
from recthinker_dagster.evaluation.report import results_table_markdown
from recthinker_dagster.settings import CLASSICAL_SYSTEMS, is_llm_system

RANKINGS = "rankings.parquet"
RANKING_COLUMNS = ["task_id", "split", "group", "user_id", "ranking", "target_item_id", *METRICS]
HEADLINE_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "mrr")  # the paper's table
METADATA_KEY = "recthinker.report"
TEACHER = "teacher"


@dataclass(frozen=True)
class ReportSettings:
    dataset: str
    n_candidates: int
    n_bootstrap: int
    seed: int


def rankings_frame(per_task: Mapping[str, pl.DataFrame], subset_ids: set[str]) -> pl.DataFrame:
    """One row per system and task: ranking, target, metrics, the agent columns (null for the
    classical systems) and ``in_llm_subset``; systems in the given order."""
    frames = [f.select(*RANKING_COLUMNS, *(c for c in AGENT_COLUMNS if c in f.columns))
              .with_columns(system=pl.lit(s), in_llm_subset=pl.col("task_id").is_in(subset_ids))
              for s, f in per_task.items()]
    return pl.concat(frames, how="diagonal_relaxed")


def write_rankings(rankings: pl.DataFrame, path: Path, settings: ReportSettings) -> None:
    import pyarrow.parquet as pq

    table = rankings.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(asdict(settings))})
    pq.write_table(table, path)


def read_rankings(path: Path) -> tuple[pl.DataFrame, ReportSettings]:
    """The rows and the report settings saved with them; a file without them is an error that says so."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize the evaluation first")
    metadata = pq.read_schema(path).metadata or {}
    saved = metadata.get(METADATA_KEY.encode())
    if saved is None:
        raise ValueError(f"{path} carries no report settings ({METADATA_KEY}): it was written before reports "
                         "could be rebuilt; rematerialize the evaluation")
    return pl.read_parquet(path), ReportSettings(**json.loads(saved))


def summaries_by_system(rows: pl.DataFrame, settings: ReportSettings) -> dict[str, pl.DataFrame]:
    """``{system: per-group summary}`` of ``rows``, systems in row order."""
    return {str(key[0]): summarize(frame, by=("group",), n_resamples=settings.n_bootstrap, seed=settings.seed)
            for key, frame in rows.partition_by("system", maintain_order=True, as_dict=True).items()}


def llm_systems(rankings: pl.DataFrame) -> list[str]:
    """The LLM systems among the rankings' systems (``sft@logits`` included)."""
    return [s for s in rankings["system"].unique(maintain_order=True).to_list() if is_llm_system(s)]


def split_summaries(rankings: pl.DataFrame, settings: ReportSettings
                    ) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """Per-group summaries on all eval tasks (systems other than the LLM ones, which only run on
    the subset) and on the LLM subset (every system)."""
    every_task = summaries_by_system(rankings.filter(~pl.col("system").is_in(llm_systems(rankings))), settings)
    return every_task, summaries_by_system(rankings.filter(pl.col("in_llm_subset")), settings)


def subset_comparisons(rankings: pl.DataFrame, settings: ReportSettings) -> list[Comparison]:
    """The headline comparisons on the LLM subset (the LLM systems are the agents, the classical
    systems the baselines, the teacher the reference)."""
    return headline_comparisons(rankings.filter(pl.col("in_llm_subset")), agents=llm_systems(rankings),
                                baselines=CLASSICAL_SYSTEMS, reference=TEACHER, seed=settings.seed)


def comparison_metrics(comparisons: Sequence[Comparison]) -> dict[str, float]:
    """``headline_<group>_<agent|teacher>_<figure>``: relative improvement, effect and p-value of
    the best agent's and the teacher's rows against the strongest baseline (MLflow metrics)."""
    names = {"best agent vs strongest baseline": "agent", "teacher vs strongest baseline": "teacher"}
    metrics: dict[str, float] = {}
    for c in comparisons:
        if c.label in names:
            prefix = f"headline_{c.group}_{names[c.label]}"
            metrics |= {f"{prefix}_relative": c.relative, f"{prefix}_effect": c.test.effect,
                        f"{prefix}_p_value": c.test.p_value}
    return metrics


@dataclass(frozen=True)
class Report:
    """Everything ``results.md`` is made of, computed once: the stage also logs and plots it."""

    summaries: dict[str, pl.DataFrame]  # every eval task, systems other than the LLM ones
    subset_summaries: dict[str, pl.DataFrame]  # the LLM subset, every system
    comparisons: list[Comparison]
    text: str  # results.md


def build_report(rankings: pl.DataFrame, settings: ReportSettings) -> Report:
    """``results.md``: the headline (every system on the LLM subset, the comparisons, the cost per
    task), then the systems that ran on every eval task."""
    every_task, subset = split_summaries(rankings, settings)
    n_eval = rankings["task_id"].n_unique()
    subset_rows = rankings.filter(pl.col("in_llm_subset"))
    n_subset = subset_rows["task_id"].n_unique()
    comparisons = subset_comparisons(rankings, settings)
    n = settings.n_candidates
    sections = [
        f"# {settings.dataset}: eval tasks, N = {n} candidates per task\n",
        f"## Every system on the same {n_subset} eval tasks (the LLM subset)\n",
        results_table_markdown(subset, HEADLINE_METRICS, n_candidates=n),
    ]
    if comparisons:
        sections += ["### Best agent against the strongest baseline\n", comparisons_markdown(comparisons)]
    cost = cost_markdown(subset_rows)
    if cost:
        sections += ["### Cost per task\n", cost]
    table = results_table_markdown(every_task, n_candidates=n) if every_task else "(no classical system)\n"
    sections += [f"## All {n_eval} eval tasks\n", table]
    return Report(every_task, subset, comparisons, "\n".join(sections))


def rebuild_report(folder: Path) -> str:
    """``results.md`` of an evaluation folder, recomputed from its ``rankings.parquet`` alone."""
    rankings, settings = read_rankings(Path(folder) / RANKINGS)
    return build_report(rankings, settings).text
