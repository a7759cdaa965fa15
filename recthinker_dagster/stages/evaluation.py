"""The evaluation stage: every system on the same frozen eval tasks of one dataset, per group.

    result = run_evaluation_stage(EvaluationSettings(systems=("popularity", "bprmf")), layout, "ml-1m",
                                  profile="smoke")
    result.artifact.folder          # assets/evaluation/ml-1m
    result.subset_summaries["bprmf"]

Classical recommenders are fitted on the index interactions (the data the tools see; BPR-MF
is the tools' own CF model); the scripted teacher and the LLM systems run through the real
agent loop and tools. LLM systems (zero-shot base model, base model with tools, SFT, SFT+RL)
cost far more per task, so they run on a fixed, group-balanced subset of the eval tasks
(``llm_tasks`` per dataset; 0: all), and a second table scores every system on exactly that
subset. The folder holds:

- ``rankings.parquet``: one row per system and task (ranking, target, metrics, the agent columns,
  ``in_llm_subset``) with the report settings as parquet metadata: ``results.md`` is a function
  of this file alone (``evaluation/results.py``, ``recthinker report``);
- ``summary.parquet``: per system and group, means and 95% bootstrap intervals, on all eval
  tasks (``tasks == "all"``, systems other than the LLM ones) and on the LLM subset
  (``tasks == "llm_subset"``, every system);
- ``results.md`` (the headline: every system on the LLM subset, the best agent against the
  strongest baseline per group with a paired test, the cost per task; then every eval task),
  ``agents.json`` (tool calls, validity, tokens and latency of
  the agent systems), ``ndcg10_by_system.png`` and, with agents, ``tool_calls_histogram.png``.

The LLM systems' finished chunks are kept under ``.work/evaluation/<dataset>`` while the stage
runs (``evaluation/llm_progress.py``): an interrupted evaluation, run again, resumes where it
stopped. The folder is removed once the evaluation is published.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import ScriptedTeacher
from recthinker_dagster.artifacts import (
    ArtifactLayout,
    index_folders,
    load_tool_indexes,
    read_lineage,
    read_table,
    read_tasks,
    read_train_interactions,
)
from recthinker_dagster.evaluation.agents import agent_summary, trajectories_per_task
from recthinker_dagster.evaluation.baselines import evaluate_recommender
from recthinker_dagster.evaluation.fusion_baseline import NAME as FUSION
from recthinker_dagster.evaluation.fusion_baseline import FusionBaseline
from recthinker_dagster.evaluation.llm_progress import files_fingerprint
from recthinker_dagster.evaluation.llm_systems import Policy, run_llm_systems
from recthinker_dagster.evaluation.report import candidates_per_task, plot_ndcg_by_system, plot_tool_use
from recthinker_dagster.evaluation.results import (
    RANKINGS,
    ReportSettings,
    build_report,
    comparison_metrics,
    rankings_frame,
    write_rankings,
)
from recthinker_dagster.recommenders.base import Recommender
from recthinker_dagster.recommenders.registry import make_recommender
from recthinker_dagster.settings import EvaluationSettings, is_llm_system, system_and_mode
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.tools import ToolIndexes, index_interactions
from recthinker_dagster.training.validation import validation_slice

ASSET = "evaluation"
TEACHER = "teacher"
SUMMARY_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "mrr")  # logged per scope, system and group
NDCG_PLOT = "ndcg10_by_system.png"
TOOL_USE_PLOT = "tool_calls_histogram.png"
# the trained assets whose adapters each LLM system merges into the base model, in order
POLICY_ADAPTERS = {"zero_shot": (), "base_tools": (), "sft": ("sft_model",), "sft_rl": ("sft_model", "rl_model"),
                   "reczero": ("reczero_model",), "recone": ("recone_sft_model", "recone_model")}


@dataclass
class EvaluationResult:
    artifact: StageArtifact
    eval_tasks: int
    llm_subset_tasks: int
    per_task: dict[str, pl.DataFrame]  # {system: one row per scored task}, in the configured order
    summaries: dict[str, pl.DataFrame]  # all eval tasks, systems other than the LLM ones
    subset_summaries: dict[str, pl.DataFrame]  # the LLM subset, every system
    agent_figures: dict[str, dict[str, float]]
    report: str


def llm_settings(settings: EvaluationSettings) -> dict:
    """The LLM systems' budgets as ``run_llm_systems`` takes them (also logged as ``llm_<key>`` params)."""
    return {
        "tasks": settings.llm_tasks,
        "max_turns": settings.llm_max_turns,
        "max_tool_calls": settings.max_tool_calls,
        "max_new_tokens": settings.llm_max_new_tokens,
        "batch_size": settings.llm_batch_size,
        "prompt_history_len": settings.prompt_history_len,
        "answer_mode": settings.answer_mode,
        **({"served_models": dict(settings.served_models)} if settings.served_models else {}),
    }


def policy_for(name: str, layout: ArtifactLayout) -> Policy:
    """The model behind an LLM system (``sft@logits`` is ``sft``'s); a missing trained adapter is
    an error that says what to run.

    Trained systems run on the backbone their adapters were trained on (their last asset's lineage)."""
    system = system_and_mode(name)[0]
    folders = []
    for asset in POLICY_ADAPTERS[system]:
        folder = layout.asset_dir(asset) / "adapter"
        if not folder.is_dir():
            raise FileNotFoundError(f"system {system!r} needs {folder}: materialize {asset} first, "
                                    f"or leave {system!r} out of the evaluation's systems")
        folders.append(folder)
    base = layout.asset_dir("base_model")
    if folders:
        try:
            base = layout.resolve(read_lineage(layout, POLICY_ADAPTERS[system][-1])["base_model"])
        except FileNotFoundError:
            pass  # an adapter without lineage: assume the published base model
    return Policy(base, tuple(folders))


def training_cost_markdown(layout: ArtifactLayout) -> str:
    """What training each trained LLM system cost: its assets' optimizer steps, training minutes
    and data (from their ``metrics.json``), summed over the assets; "" when none is published."""
    rows = []
    for system, assets in POLICY_ADAPTERS.items():
        paths = [layout.asset_dir(asset) / "metrics.json" for asset in assets]
        if not assets or not all(path.exists() for path in paths):
            continue
        metrics = [json.loads(path.read_text()) for path in paths]
        steps = " + ".join(str(m.get("global_step", "?")) for m in metrics)
        minutes = sum(float(m.get("train_seconds") or 0.0) for m in metrics) / 60
        data = " + ".join(f"{m['n_examples']} examples" if "n_examples" in m else f"{m.get('n_tasks', '?')} tasks"
                          for m in metrics)
        rows.append(f"| {system} | {' + '.join(assets)} | {steps} | {minutes:.1f} | {data} |")
    if not rows:
        return ""
    return "\n".join(["## Training cost", "",
                      "Optimizer steps, training minutes (the last attempt of each asset) and training data.", "",
                      "| system | trained assets | steps | train min | data |", "|---|---|---:|---:|---|", *rows, ""])


def fitted_recommender(system: str, visible: pl.DataFrame, indexes: ToolIndexes | None,
                       settings: EvaluationSettings, dataset: str = "") -> Recommender:
    """A classical system fitted on the index interactions; BPR-MF, item-kNN and SASRec are the
    tools' own scorers (``score_candidates``), so the baselines and the agent's signals agree
    (without ``indexes``, or for a suite built before item-kNN and SASRec joined it, they are
    fitted here with their defaults). ``fusion`` fuses the tool suite's signals with the
    teacher's tuned weights for ``dataset`` (``evaluation/fusion_baseline.py``)."""
    if system == FUSION:
        if indexes is None:
            raise ValueError("the fusion baseline needs the tool indexes (it fuses their signals)")
        return FusionBaseline(indexes, dataset)
    if system == "bprmf" and indexes is not None:
        return indexes.bprmf
    if system in ("itemknn", "sasrec") and getattr(indexes, system, None) is not None:
        return getattr(indexes, system)
    params: dict = {"seed": settings.seed} if system in ("sasrec", "random") else {}
    return make_recommender(system, **params).fit(visible)


def teacher_per_task(eval_tasks: pl.DataFrame, indexes: ToolIndexes, settings: EvaluationSettings) -> pl.DataFrame:
    """The scripted teacher's rows on ``eval_tasks`` (its budgets: ``max_turns``, ``max_tool_calls``)."""
    teacher = ScriptedTeacher(config=AgentConfig(max_turns=settings.max_turns, max_tool_calls=settings.max_tool_calls))
    tasks = agent_tasks(eval_tasks, indexes, prompt_history_len=settings.prompt_history_len)
    trajectories = teacher.run(tasks, Toolboxes(indexes), sample_index=0, seed=settings.seed)
    return trajectories_per_task(trajectories)


def llm_progress_dir(layout: ArtifactLayout, dataset: str) -> Path:
    return layout.work_dir("evaluation", dataset)


def llm_per_task(systems: list[str], subset: pl.DataFrame, indexes: ToolIndexes, settings: EvaluationSettings,
                 layout: ArtifactLayout, dataset: str, log: Callable[[str], None]) -> dict[str, pl.DataFrame]:
    """The LLM systems' rows on the subset (each distinct model loaded once; finished chunks
    kept in ``llm_progress_dir`` until the evaluation is published)."""
    llm = llm_settings(settings)
    trajectories = run_llm_systems(
        {s: policy_for(s, layout) for s in systems},
        agent_tasks(subset, indexes, prompt_history_len=llm["prompt_history_len"]),
        Toolboxes(indexes), llm, progress=log, progress_dir=llm_progress_dir(layout, dataset),
        inputs_key=files_fingerprint(index_folders(layout, dataset).values()),
    )
    return {system: trajectories_per_task(found) for system, found in trajectories.items()}


def evaluation_metrics(seconds: Mapping[str, float], summaries: Mapping[str, pl.DataFrame],
                       subset_summaries: Mapping[str, pl.DataFrame], agent_figures: Mapping[str, Mapping]) -> dict:
    """``seconds_<system>``, ``<all|subset>_<system>_<group>_<metric>`` and ``<system>_<agent figure>``."""
    metrics = {"seconds_" + s: v for s, v in seconds.items()}
    for scope, scoped in (("all", summaries), ("subset", subset_summaries)):
        for system, summary in scoped.items():
            for row in summary.iter_rows(named=True):
                for metric in SUMMARY_METRICS:
                    metrics[f"{scope}_{system}_{row['group']}_{metric}"] = row[metric]
    for system, figures in agent_figures.items():
        metrics.update({f"{system}_{k}": v for k, v in figures.items()})
    return metrics


def write_evaluation(staging: Path, rankings: pl.DataFrame, report_settings: ReportSettings,
                     summaries: Mapping[str, pl.DataFrame], subset_summaries: Mapping[str, pl.DataFrame],
                     report: str, agent_figures: Mapping[str, Mapping], per_task: Mapping[str, pl.DataFrame]) -> None:
    """The evaluation folder's files (see the module docstring)."""
    write_rankings(rankings, staging / RANKINGS, report_settings)
    n_candidates = report_settings.n_candidates
    pl.concat(
        [s.with_columns(system=pl.lit(n), tasks=pl.lit("all")) for n, s in summaries.items()]
        + [s.with_columns(system=pl.lit(n), tasks=pl.lit("llm_subset")) for n, s in subset_summaries.items()],
        how="diagonal_relaxed",
    ).with_columns(n_candidates=pl.lit(n_candidates)).write_parquet(staging / "summary.parquet")
    (staging / "results.md").write_text(report)
    (staging / "agents.json").write_text(json.dumps(agent_figures, indent=2))
    n_subset = rankings.filter(pl.col("in_llm_subset"))["task_id"].n_unique()
    plot_ndcg_by_system(subset_summaries, staging / NDCG_PLOT,
                        title=f"{report_settings.dataset}: NDCG@10 by system and group ({n_subset} eval tasks)",
                        n_candidates=n_candidates)
    if agent_figures:
        plot_tool_use(per_task, staging / TOOL_USE_PLOT, title=f"{report_settings.dataset}: tool calls per task")


def score_systems(settings: EvaluationSettings, layout: ArtifactLayout, dataset: str, eval_tasks: pl.DataFrame,
                  subset: pl.DataFrame, log: Callable[[str], None]
                  ) -> tuple[dict[str, pl.DataFrame], dict[str, float]]:
    """``{system: per-task rows}`` in the configured order, and the seconds each took.

    The LLM systems run first (on the subset), then the others on every eval task."""
    indexes = load_tool_indexes(layout, dataset)
    per_task: dict[str, pl.DataFrame] = {}
    seconds: dict[str, float] = {}
    llm_systems = [s for s in settings.systems if is_llm_system(s)]
    if llm_systems:
        started = time.perf_counter()
        per_task.update(llm_per_task(llm_systems, subset, indexes, settings, layout, dataset,
                                     lambda m: log(f"{dataset}: {m}")))
        seconds["llm_systems"] = time.perf_counter() - started
        log(f"{dataset}: LLM systems {llm_systems} on {subset.height} tasks in {seconds['llm_systems']:.1f}s")
    visible = None
    for system in [s for s in settings.systems if not is_llm_system(s)]:
        started = time.perf_counter()
        if system == TEACHER:
            per_task[system] = teacher_per_task(eval_tasks, indexes, settings)
        else:
            if visible is None:
                visible = index_interactions(read_train_interactions(layout, dataset), read_tasks(layout, dataset))
            recommender = fitted_recommender(system, visible, indexes, settings, dataset)
            per_task[system] = evaluate_recommender(recommender, eval_tasks, seed=settings.seed)
        seconds[system] = time.perf_counter() - started
        log(f"{dataset}: {system} scored {eval_tasks.height} eval tasks in {seconds[system]:.1f}s")
    return {s: per_task[s] for s in settings.systems}, seconds


def run_evaluation_stage(settings: EvaluationSettings, layout: ArtifactLayout, dataset: str, *, profile: str,
                         log: Callable[[str], None] = print) -> EvaluationResult:
    """Score ``settings.systems`` on the eval tasks of ``dataset`` and write ``assets/evaluation/<dataset>``."""
    eval_tasks = read_table(layout, "task_splits", dataset, "tasks_eval.parquet")
    subset = validation_slice(eval_tasks, settings.llm_tasks)
    per_task, seconds = score_systems(settings, layout, dataset, eval_tasks, subset, log)
    n_candidates = candidates_per_task(eval_tasks)
    rankings = rankings_frame(per_task, set(subset["task_id"].to_list()))
    report_settings = ReportSettings(dataset, n_candidates, settings.n_bootstrap, settings.seed)
    built = build_report(rankings, report_settings)
    report = built.text
    agent_figures = {s: figures for s, f in per_task.items() if (figures := agent_summary(f))}
    folder = layout.asset_dir(ASSET, dataset)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        write_evaluation(staging, rankings, report_settings, built.summaries, built.subset_summaries, report, agent_figures,
                         per_task)
    shutil.rmtree(llm_progress_dir(layout, dataset), ignore_errors=True)  # published: the chunks are spent
    artifact = StageArtifact(
        folder=folder,
        params={"dataset": dataset, "systems": ",".join(settings.systems), "profile": profile,
                "eval_tasks": eval_tasks.height, "n_candidates": n_candidates,
                **{f"llm_{k}": v for k, v in llm_settings(settings).items()}},
        metrics=evaluation_metrics(seconds, built.summaries, built.subset_summaries, agent_figures)
                | comparison_metrics(built.comparisons),
        metadata={
            "results": Markdown(report),
            "agents": Json(agent_figures),
            "headline": Json([{"group": c.group, "comparison": c.label, "system": c.system, "other": c.other,
                               "value": c.value, "other_value": c.other_value, "relative": c.relative,
                               "test": c.test.to_dict()} for c in built.comparisons]),
            "eval_tasks": eval_tasks.height,
            "llm_subset_tasks": subset.height,
            "plot": folder / NDCG_PLOT,
        },
        texts={"results.md": report},
        artifacts={ASSET: folder},
    )
    return EvaluationResult(artifact, eval_tasks.height, subset.height, per_task, built.summaries, built.subset_summaries,
                            agent_figures, report)

