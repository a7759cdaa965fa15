"""Training assets shared by all datasets: ``filtered_trajectories`` and ``sft_model``.

``filtered_trajectories`` judges every teacher trajectory of every dataset with the SFT recipe's
filter (the reasons are kept per trajectory) and guards the kept set with a Great Expectations
suite: on the staged set before it is published (write-audit-publish), then as a blocking
check. ``sft_model`` trains a LoRA adapter on it with TRL and scores the agent on a fixed
validation slice before and after training; the run resumes from its last checkpoint
(``stages.sft``). The logic lives in ``stages.filtering`` and ``stages.sft``.
"""

import dagster as dg

from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import FilterStageConfig, SFTTrainingConfig
from recthinker_dagster.defs.publishing import (
    Gate,
    audited,
    check_result,
    mlflow_attempt,
    publication_lock,
    publish_artifact,
)
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.filtering import build_filtered_trajectories_stage, check_sft_examples
from recthinker_dagster.stages.sft import build_sft_model_stage

SFT_CHECK = "sft_examples_quality"


def build_training_assets(datasets: list[str]) -> list:
    split_keys = keys.dataset_keys(datasets, "task_splits")
    suite_keys = keys.dataset_keys(datasets, "tool_suite")

    @dg.asset(
        key=keys.FILTERED_TRAJECTORIES,
        deps=[*keys.dataset_keys(datasets, "teacher_trajectories"), *split_keys, keys.BASE_MODEL],
        group_name=keys.AGENT_GROUP,
        kinds={"dvc"},
        description="Teacher trajectories of every dataset kept or dropped by the SFT recipe's filter, "
        "with the reasons; the best survivor per task.",
    )
    def filtered_trajectories(
        context: dg.AssetExecutionContext,
        config: FilterStageConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ):
        check = dg.AssetCheckKey(keys.FILTERED_TRAJECTORIES, SFT_CHECK)
        gates = {paths.asset_dir("filtered_trajectories"): Gate(keys.FILTERED_TRAJECTORIES, check)}
        with publication_lock(context, paths, gates):
            result = yield from audited(context, paths, gates, lambda: build_filtered_trajectories_stage(
                config.settings(), paths.layout, datasets, log=context.log.info
            ))
            yield publish_artifact(context, keys.FILTERED_TRAJECTORIES, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset_check(
        asset=keys.FILTERED_TRAJECTORIES,
        name=SFT_CHECK,
        blocking=True,
        description="Great Expectations on the SFT set: at least min_examples trajectories, both user groups, "
        "train tasks only, one per task, no eval-task user or target. Blocking.",
    )
    def sft_examples_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        return check_result(check_sft_examples(paths.layout, datasets), keys.FILTERED_TRAJECTORIES)

    @dg.asset(
        key=keys.SFT_MODEL,
        deps=[keys.FILTERED_TRAJECTORIES, keys.BASE_MODEL, *split_keys, *suite_keys],
        group_name=keys.AGENT_GROUP,
        pool=keys.HEAVY_POOL,
        kinds={"pytorch", "dvc"},
        description="A LoRA adapter trained with TRL's SFTTrainer on the filtered trajectories (assistant tokens only), "
        "validated before and after training; resumable.",
    )
    def sft_model(
        context: dg.AssetExecutionContext,
        config: SFTTrainingConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        with publication_lock(context, paths, [paths.asset_dir("sft_model")]), \
                mlflow_attempt(context, mlflow, keys.SFT_MODEL) as run_id:  # the lock also guards the work files
            result = build_sft_model_stage(config.settings(), paths.layout, datasets, log=context.log.info)
            return publish_artifact(context, keys.SFT_MODEL, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow,
                                    run_id=run_id)

    return [filtered_trajectories, sft_examples_check, sft_model]
