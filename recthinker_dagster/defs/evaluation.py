"""The ``evaluation`` asset: every system on the same frozen eval tasks, per group.

Classical recommenders are fitted here on the index interactions (the data the tools see;
BPR-MF is the tools' own CF model); agents run through the real loop and tools. Per-task
rankings are saved, so anyone can recompute every number.
"""

import json
import time

import dagster as dg
import polars as pl

from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import ScriptedTeacher
from recthinker_dagster.defs.config import EVALUATED_SYSTEMS, EvaluationConfig
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
from recthinker_dagster.evaluation.report import (
    plot_ndcg_by_system,
    results_table_markdown,
)
from recthinker_dagster.recommenders.registry import make_recommender
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.tools import index_interactions


def build_evaluation_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    key = dg.AssetKey([prefix, "evaluation"])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey([prefix, "tool_suite"]), dg.AssetKey([prefix, "task_splits"])],
        group_name=prefix,
        kinds={"dvc"},
        description="NDCG@1/5/10, HR@1/5/10 and MRR with bootstrap 95% CIs for every system, per group.",
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
        for system in config.systems:
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

        summaries = {s: summarize(f, by=("group",), n_resamples=config.n_bootstrap, seed=profile.seed) for s, f in per_task.items()}
        table = results_table_markdown(summaries)
        agent_figures = {s: figures for s, f in per_task.items() if (figures := agent_summary(f))}
        folder = paths.asset_dir("evaluation", dataset)
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            pl.concat(
                [f.select(_COMMON).with_columns(system=pl.lit(s)) for s, f in per_task.items()], how="vertical"
            ).write_parquet(staging / "rankings.parquet")
            pl.concat([s.with_columns(system=pl.lit(n)) for n, s in summaries.items()], how="diagonal_relaxed").write_parquet(
                staging / "summary.parquet"
            )
            (staging / "results.md").write_text(f"# {dataset}: eval tasks\n\n{table}\n")
            (staging / "agents.json").write_text(json.dumps(agent_figures, indent=2))
            plot_ndcg_by_system(summaries, staging / "ndcg10_by_system.png", title=f"{dataset}: NDCG@10 by system and group")
        metrics = {"seconds_" + s: v for s, v in seconds.items()}
        for system, summary in summaries.items():
            for row in summary.iter_rows(named=True):
                for metric in ("ndcg@1", "ndcg@5", "ndcg@10", "mrr"):
                    metrics[f"{system}_{row['group']}_{metric}"] = row[metric]
        for system, figures in agent_figures.items():
            metrics.update({f"{system}_{k}": v for k, v in figures.items()})
        return publish(
            context,
            asset_key=key,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"dataset": dataset, "systems": ",".join(config.systems), "profile": config.profile, "eval_tasks": eval_tasks.height},
            metrics=metrics,
            metadata={
                "results": dg.MetadataValue.md(table),
                "agents": dg.MetadataValue.json(agent_figures),
                "eval_tasks": eval_tasks.height,
                "plot": dg.MetadataValue.path(str((folder / "ndcg10_by_system.png").relative_to(paths.root_path))),
            },
            texts={"results.md": table},
        )

    return [evaluation]


_COMMON = ["task_id", "split", "group", "user_id", "ranking", "target_item_id", "ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"]


def _fitted(system: str, interactions: pl.DataFrame, config: EvaluationConfig, profile):
    params = {}
    if system == "sasrec":
        params["train_windows"] = config.sasrec_train_windows or profile.sasrec_train_windows
        params["seed"] = profile.seed
    elif system == "random":
        params["seed"] = profile.seed
    return make_recommender(system, **params).fit(interactions)
