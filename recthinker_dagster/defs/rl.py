"""The ``rl_model`` asset: GRPO on top of the SFT adapter, over real tool-using rollouts.

The logic (train tasks, resumable run, validation of the SFT and SFT+RL policies on the same
slice) lives in ``stages.rl``. The asset holds the folder's publication lock from the start of
training to the DVC push, so a second run waits rather than share the resumable work files.
"""

import dagster as dg

from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import RLStageConfig
from recthinker_dagster.defs.publishing import mlflow_attempt, publication_lock, publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.rl import build_rl_model_stage


def build_rl_assets(datasets: list[str]) -> list:
    @dg.asset(
        key=keys.RL_MODEL,
        deps=[keys.SFT_MODEL, keys.FILTERED_TRAJECTORIES,  # the 'unimitated' task pool reads its decisions
              *keys.dataset_keys(datasets, "task_splits"), *keys.dataset_keys(datasets, "tool_suite")],
        group_name=keys.AGENT_GROUP,
        pool=keys.HEAVY_POOL,
        kinds={"pytorch", "dvc"},
        description="A LoRA adapter trained with TRL's GRPOTrainer on top of the SFT policy, over multi-turn rollouts "
        "with the real tools; rewards: ranking (NDCG@10), format, tool efficiency. Resumable.",
    )
    def rl_model(
        context: dg.AssetExecutionContext,
        config: RLStageConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        with publication_lock(context, paths, [paths.asset_dir("rl_model")]), \
                mlflow_attempt(context, mlflow, keys.RL_MODEL) as run_id:  # the lock also guards the work files
            result = build_rl_model_stage(config.settings(), paths.layout, datasets, log=context.log.info)
            return publish_artifact(context, keys.RL_MODEL, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow,
                                    run_id=run_id)

    return [rl_model]
