"""The ``evaluation`` asset: every system on the same frozen eval tasks, per group.

Classical recommenders are fitted here on the index interactions (the data the tools see;
BPR-MF is the tools' own CF model); agents run through the real loop and tools. LLM systems
(zero-shot base model, base model with tools, SFT, SFT+RL) cost far more per task, so they run
on a fixed, group-balanced subset of the eval tasks (``llm_tasks`` per dataset; 0: all), and a
second table scores every system on exactly that subset. Per-task rankings (with an
``in_llm_subset`` flag) are saved, so anyone can recompute every number.
"""

import json
import time
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import ScriptedTeacher
from recthinker_dagster.defs.config import (
    EVALUATED_SYSTEMS,
    LLM_SYSTEMS,
    EvaluationConfig,
)
from recthinker_dagster.defs.datasets import key_prefix, read_table
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.tools import load_tasks, load_tool_indexes
from recthinker_dagster.evaluation.agents import agent_summary, trajectories_per_task
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.evaluation.llm_systems import Policy, run_llm_systems
from recthinker_dagster.evaluation.report import (
    plot_ndcg_by_system,
    plot_tool_use,
    results_table_markdown,
)
from recthinker_dagster.recommenders.registry import make_recommender
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.tools import index_interactions
from recthinker_dagster.training.validation import validation_slice


def build_evaluation_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    key = dg.AssetKey([prefix, "evaluation"])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey([prefix, "tool_suite"]), dg.AssetKey([prefix, "task_splits"]), dg.AssetKey("base_model"),
              dg.AssetKey("sft_model"), dg.AssetKey("rl_model")],
        group_name=prefix,
        kinds={"dvc"},
        description="NDCG@1/5/10, HR@1/5/10 and MRR with bootstrap 95% CIs for every system (classical, teacher, "
        "zero-shot LLM, LLM with tools, SFT, SFT+RL), per group.",
    )
    def evaluation(
        context: dg.AssetExecutionContext,
        config: EvaluationConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        unknown = sorted(set(config.systems) - set(EVALUATED_SYSTEMS))
        if unknown:
            raise ValueError(f"unknown systems {unknown}; known: {EVALUATED_SYSTEMS}")
        profile = config.resolved_profile()
        eval_tasks = read_table(paths, "task_splits", dataset, "tasks_eval.parquet")
        indexes = load_tool_indexes(paths, dataset)
        visible = index_interactions(
            read_table(paths, "task_splits", dataset, "train_interactions.parquet"), load_tasks(paths, dataset)
        )
        per_task: dict[str, pl.DataFrame] = {}
        seconds: dict[str, float] = {}
        llm = config.llm_settings()
        subset = validation_slice(eval_tasks, llm["tasks"])
        llm_systems = [s for s in config.systems if s in LLM_SYSTEMS]
        if llm_systems:
            started = time.perf_counter()
            trajectories = run_llm_systems(
                {s: _policy(s, paths) for s in llm_systems},
                agent_tasks(subset, indexes, prompt_history_len=llm["prompt_history_len"]),
                TaskToolboxes(indexes, subset), llm, progress=lambda m: context.log.info(f"{dataset}: {m}"),
            )
            for system, system_trajectories in trajectories.items():
                per_task[system] = trajectories_per_task(system_trajectories)
            seconds["llm_systems"] = time.perf_counter() - started
            context.log.info(f"{dataset}: LLM systems {llm_systems} on {subset.height} tasks in "
                             f"{time.perf_counter() - started:.1f}s")
        for system in [s for s in config.systems if s not in LLM_SYSTEMS]:
            started = time.perf_counter()
            if system == "teacher":
                teacher = ScriptedTeacher(config=AgentConfig(max_turns=profile.max_turns, max_tool_calls=profile.max_tool_calls))
                tasks = agent_tasks(eval_tasks, indexes, prompt_history_len=profile.prompt_history_len)
                trajectories = teacher.run(tasks, TaskToolboxes(indexes, eval_tasks), sample_index=0, seed=profile.seed)
                per_task[system] = trajectories_per_task(trajectories)
            else:
                recommender = indexes.bprmf if system == "bprmf" else _fitted(system, visible, config, profile)
                per_task[system] = evaluate_recommender(recommender, eval_tasks, seed=profile.seed)
            seconds[system] = time.perf_counter() - started
            context.log.info(f"{dataset}: {system} scored {eval_tasks.height} eval tasks in {seconds[system]:.1f}s")

        per_task = {s: per_task[s] for s in config.systems}  # the configured order
        in_subset = set(subset["task_id"].to_list())
        full_systems = [s for s in per_task if s not in LLM_SYSTEMS]
        summaries = {s: summarize(per_task[s], by=("group",), n_resamples=config.n_bootstrap, seed=profile.seed)
                     for s in full_systems}
        subset_summaries = {
            s: summarize(f.filter(pl.col("task_id").is_in(in_subset)), by=("group",), n_resamples=config.n_bootstrap,
                         seed=profile.seed)
            for s, f in per_task.items()
        }
        table = results_table_markdown(summaries) if summaries else "(no classical system)"
        subset_table = results_table_markdown(subset_summaries)
        report = (f"# {dataset}: eval tasks\n\n## All {eval_tasks.height} eval tasks\n\n{table}\n\n"
                  f"## Every system on the same {subset.height} eval tasks (the LLM subset)\n\n{subset_table}\n")
        agent_figures = {s: figures for s, f in per_task.items() if (figures := agent_summary(f))}
        folder = paths.asset_dir("evaluation", dataset)
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            pl.concat(
                [f.select(_COMMON).with_columns(system=pl.lit(s), in_llm_subset=pl.col("task_id").is_in(in_subset))
                 for s, f in per_task.items()], how="vertical"
            ).write_parquet(staging / "rankings.parquet")
            pl.concat(
                [s.with_columns(system=pl.lit(n), tasks=pl.lit("all")) for n, s in summaries.items()]
                + [s.with_columns(system=pl.lit(n), tasks=pl.lit("llm_subset")) for n, s in subset_summaries.items()],
                how="diagonal_relaxed",
            ).write_parquet(staging / "summary.parquet")
            (staging / "results.md").write_text(report)
            (staging / "agents.json").write_text(json.dumps(agent_figures, indent=2))
            plot_ndcg_by_system(subset_summaries, staging / "ndcg10_by_system.png",
                                title=f"{dataset}: NDCG@10 by system and group ({subset.height} eval tasks)")
            if agent_figures:
                plot_tool_use(per_task, staging / "tool_calls_histogram.png", title=f"{dataset}: tool calls per task")
        metrics = {"seconds_" + s: v for s, v in seconds.items()}
        for scope, scoped in (("all", summaries), ("subset", subset_summaries)):
            for system, summary in scoped.items():
                for row in summary.iter_rows(named=True):
                    for metric in ("ndcg@1", "ndcg@5", "ndcg@10", "mrr"):
                        metrics[f"{scope}_{system}_{row['group']}_{metric}"] = row[metric]
        for system, figures in agent_figures.items():
            metrics.update({f"{system}_{k}": v for k, v in figures.items()})
        return publish(
            context,
            asset_key=key,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"dataset": dataset, "systems": ",".join(config.systems), "profile": config.profile,
                    "eval_tasks": eval_tasks.height, **{f"llm_{k}": v for k, v in llm.items()}},
            metrics=metrics,
            metadata={
                "results": dg.MetadataValue.md(report),
                "agents": dg.MetadataValue.json(agent_figures),
                "eval_tasks": eval_tasks.height,
                "llm_subset_tasks": subset.height,
                "plot": dg.MetadataValue.path(str((folder / "ndcg10_by_system.png").relative_to(paths.root_path))),
            },
            texts={"results.md": report},
            artifacts={"evaluation": folder},
        )

    return [evaluation]


_COMMON = ["task_id", "split", "group", "user_id", "ranking", "target_item_id", "ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"]


def _policy(system: str, paths: ProjectPaths) -> Policy:
    """The model behind an LLM system; a missing trained adapter is an error that says what to run."""
    base = paths.asset_dir("base_model")
    adapters = {"zero_shot": [], "base_tools": [], "sft": ["sft_model"], "sft_rl": ["sft_model", "rl_model"]}[system]
    folders = []
    for asset in adapters:
        folder = paths.asset_dir(asset) / "adapter"
        if not folder.is_dir():
            raise FileNotFoundError(f"system {system!r} needs {folder}: materialize {asset} first, "
                                    f"or leave {system!r} out of the evaluation's systems")
        folders.append(folder)
    lineage = paths.asset_dir("sft_model") / "lineage.json"
    if adapters and lineage.exists():  # the backbone the adapters were trained on
        recorded = Path(json.loads(lineage.read_text())["base_model"])
        base = recorded if recorded.is_absolute() else paths.root_path / recorded
    return Policy(base, tuple(folders))


def _fitted(system: str, interactions: pl.DataFrame, config: EvaluationConfig, profile):
    params = {}
    if system == "sasrec":
        params["train_windows"] = config.sasrec_train_windows or profile.sasrec_train_windows
        params["seed"] = profile.seed
    elif system == "random":
        params["seed"] = profile.seed
    return make_recommender(system, **params).fit(interactions)
