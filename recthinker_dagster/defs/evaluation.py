"""The ``evaluation`` asset: every system on the same frozen eval tasks, per group.

The work is :func:`~recthinker_dagster.stages.evaluation.run_evaluation_stage` (classical
recommenders, the scripted teacher, and the LLM systems on a group-balanced subset of the
eval tasks); this module resolves its settings and publishes its folder.
"""

import dagster as dg

from recthinker_dagster.artifacts import key_prefix
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import EvaluationConfig
from recthinker_dagster.defs.publishing import publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.evaluation import run_evaluation_stage


def build_evaluation_assets(dataset: str) -> list:
    key = keys.dataset_key(dataset, "evaluation")

    @dg.asset(
        key=key,
        deps=[keys.dataset_key(dataset, "tool_suite"), keys.dataset_key(dataset, "task_splits"), keys.BASE_MODEL,
              keys.SFT_MODEL, keys.RL_MODEL],
        group_name=key_prefix(dataset),
        kinds={"dvc"},
        pool=keys.HEAVY_POOL,  # the LLM systems
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
        result = run_evaluation_stage(config.settings(), paths.layout, dataset, profile=config.profile,
                                      log=context.log.info)
        return publish_artifact(context, key, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    return [evaluation]
