"""A code location for the Celery test: one dataset's ingestion through its tool indexes, with
the project's own executor switch (``$RECTHINKER_EXECUTOR=celery``) and resources (the project
root is ``$RECTHINKER_HOME``). The run process and the workers both load it by module name."""

from __future__ import annotations

import dagster as dg

from recthinker_dagster.definitions import configured_executor
from recthinker_dagster.defs.datasets import build_dataset_assets
from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths
from recthinker_dagster.defs.tools import build_tool_assets
from tests.support.project import run_config

DATASET = "synthetic"
JOB = "dataset_branch"

assets = build_dataset_assets(DATASET) + build_tool_assets(DATASET)
defs = dg.Definitions(
    assets=assets,
    jobs=[dg.define_asset_job(JOB, selection=dg.AssetSelection.all(), config=run_config(DATASET, with_tools=True))],
    resources={"paths": ProjectPaths(), "dvc": DVCVersioning(), "mlflow": MLflowTracking()},
    executor=configured_executor(),
)
