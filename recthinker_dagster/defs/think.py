"""Think before recommend (RecZero, RecOne): the tool-free recipes as assets beside the agent.

``<dataset>/think_trajectories`` (the thinking teacher) -> ``recone_sft_model`` (SFT cold start)
-> ``recone_model`` (GRPO); ``reczero_model`` (GRPO from the base model). The assets are in the
``think`` group and its own jobs (``think_<profile>``), so the agent's pipeline never waits for
them; the evaluation scores them when its ``systems`` name ``reczero`` and ``recone``. The
logic lives in ``stages.think``.
"""

import dagster as dg

from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import ThinkConfig
from recthinker_dagster.defs.publishing import mlflow_attempt, publication_lock, publish_artifact
from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths
from recthinker_dagster.stages.think import (
    RECONE,
    RECONE_SFT,
    RECZERO,
    build_recone_sft_stage,
    build_think_rl_stage,
    build_think_trajectories_stage,
)

GROUP = "think"


def build_think_assets(datasets: list[str]) -> list:
    inputs = [keys.BASE_MODEL, *keys.dataset_keys(datasets, "task_splits"), *keys.dataset_keys(datasets, "tool_suite")]
    assets = [think_trajectories_asset(dataset) for dataset in datasets]
    assets.append(trained_asset(RECONE_SFT, [*keys.dataset_keys(datasets, "think_trajectories"), *inputs], datasets,
                                "RecOne's cold start: a LoRA adapter trained with TRL's SFTTrainer on the thinking "
                                "teacher's reasoning (best sample per task), validated in the think conversation."))
    assets.append(trained_asset(RECONE, [dg.AssetKey(RECONE_SFT), *inputs], datasets,
                                "RecOne: GRPO on the RecOne SFT policy over tool-free think rollouts (recipe recone)."))
    assets.append(trained_asset(RECZERO, inputs, datasets,
                                "RecZero: pure GRPO from the base model over tool-free think rollouts (recipe reczero)."))
    return assets


def think_trajectories_asset(dataset: str):
    key = keys.dataset_key(dataset, "think_trajectories")

    @dg.asset(
        key=key,
        deps=[keys.dataset_key(dataset, "tool_suite"), keys.dataset_key(dataset, "task_splits"), keys.BASE_MODEL],
        group_name=GROUP,
        kinds={"dvc"},
        description="The thinking teacher's trajectories on the train tasks: the investigator's ranking, written as "
        "<user>, <candidates> and <match> reasoning in one tool-free turn; resumable.",
    )
    def think_trajectories(context: dg.AssetExecutionContext, config: ThinkConfig, paths: ProjectPaths,
                           dvc: DVCVersioning, mlflow: MLflowTracking) -> dg.MaterializeResult:
        result = build_think_trajectories_stage(config.settings(), config.teacher_settings(), paths.layout, dataset,
                                                log=context.log.info)
        return publish_artifact(context, key, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    return think_trajectories


def trained_asset(name: str, deps: list, datasets: list[str], description: str):
    key = dg.AssetKey(name)

    @dg.asset(key=key, deps=deps, group_name=GROUP, kinds={"pytorch", "dvc"}, description=description,
              pool=keys.HEAVY_POOL)
    def trained(context: dg.AssetExecutionContext, config: ThinkConfig, paths: ProjectPaths, dvc: DVCVersioning,
                mlflow: MLflowTracking) -> dg.MaterializeResult:
        with publication_lock(context, paths, [paths.asset_dir(name)]), \
                mlflow_attempt(context, mlflow, key) as run_id:  # the lock also guards the work files
            settings = config.settings()
            if name == RECONE_SFT:
                result = build_recone_sft_stage(settings, paths.layout, datasets, log=context.log.info)
            else:
                result = build_think_rl_stage(settings, paths.layout, datasets, name, log=context.log.info)
            return publish_artifact(context, key, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow, run_id=run_id)

    return trained
