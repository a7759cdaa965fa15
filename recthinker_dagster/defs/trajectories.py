"""The ``teacher_trajectories`` asset: K teacher samples per train task, resumable.

Generation (``stages.trajectories``) appends complete JSON lines to a work file under
``.work/`` named by the settings' hash, so a killed run continues where it stopped on the
next materialization (same settings) without redoing finished tasks. Only a complete file
is published (staged folder, DVC, MLflow); the work file is removed afterwards.
"""

import dagster as dg

from recthinker_dagster.artifacts import key_prefix
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import TeacherConfig
from recthinker_dagster.defs.publishing import publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.trajectories import build_teacher_trajectories_stage


def build_trajectory_assets(dataset: str) -> list:
    key = keys.dataset_key(dataset, "teacher_trajectories")

    @dg.asset(
        key=key,
        deps=[keys.dataset_key(dataset, "tool_suite"), keys.dataset_key(dataset, "task_splits"), keys.BASE_MODEL],
        group_name=key_prefix(dataset),
        kinds={"dvc"},
        description=(
            "Teacher trajectories on the train tasks (K samples each): Analyze-Plan-Act turns, real tool calls "
            "and results, final ranking and metrics, conversation tokens (base model's tokenizer); resumable."
        ),
    )
    def teacher_trajectories(
        context: dg.AssetExecutionContext,
        config: TeacherConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        result = build_teacher_trajectories_stage(config.settings(), paths.layout, dataset, log=context.log.info)
        return publish_artifact(context, key, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    return [teacher_trajectories]
