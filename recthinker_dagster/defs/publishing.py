"""Turn a finished artifact folder into a versioned, tracked Dagster materialization."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import folder_size_bytes


def publish(
    context: dg.AssetExecutionContext,
    *,
    asset_key: dg.AssetKey,
    folder: Path,
    paths: ProjectPaths,
    dvc: DVCVersioning,
    mlflow: MLflowTracking,
    params: dict[str, Any],
    metrics: dict[str, float],
    metadata: dict[str, Any],
    texts: dict[str, str] | None = None,
    series: dict[str, list[float]] | None = None,
    artifacts: dict[str, Path] | None = None,
) -> dg.MaterializeResult:
    """Add ``folder`` to DVC, log an MLflow run, and build the MaterializeResult.

    The DVC md5 is the asset's Dagster data version, an MLflow tag and a metadata entry,
    so any past version can be found from either UI and restored from the DVC cache.
    """
    started = time.perf_counter()
    version = dvc.track(folder)
    md5 = version["md5"]
    metrics = {**metrics, "artifact_bytes": folder_size_bytes(folder), "dvc_seconds": time.perf_counter() - started}
    key_path = "/".join(asset_key.path)
    run_id = mlflow.log_run(
        key_path,
        params=params,
        metrics=metrics,
        tags={
            "asset": key_path,
            "dagster_run_id": context.run.run_id,
            "dvc_md5": md5,
            "dvc_file": version.get("dvc_file", ""),
        },
        texts=texts,
        series=series,
        artifacts=artifacts,
    )
    context.log.info(f"{key_path}: DVC {md5 or '(disabled)'}, MLflow run {run_id or '(disabled)'}")
    return dg.MaterializeResult(
        asset_key=asset_key,
        metadata={
            **metadata,
            "path": dg.MetadataValue.path(str(folder.relative_to(paths.root_path))),
            "dvc_md5": md5,
            "mlflow_run_id": run_id,
            "artifact_bytes": metrics["artifact_bytes"],
        },
        data_version=dg.DataVersion(md5) if md5 else None,
    )


def preview(frame: pl.DataFrame, rows: int = 5) -> dg.MetadataValue:
    """A small Markdown table for the Dagster UI (lists shortened for readability)."""
    head = frame.head(rows).with_columns(
        [pl.col(c).cast(pl.List(pl.Utf8)).list.head(5).list.join(", ") for c, t in frame.schema.items() if isinstance(t, pl.List)]
    )
    return dg.MetadataValue.md(head.to_pandas().to_markdown(index=False))


def publish_artifact(
    context: dg.AssetExecutionContext,
    asset_key: dg.AssetKey,
    artifact: StageArtifact,
    *,
    paths: ProjectPaths,
    dvc: DVCVersioning,
    mlflow: MLflowTracking,
) -> dg.MaterializeResult:
    """:func:`publish` a stage's artifact, then delete the work files it no longer needs."""
    result = publish(
        context,
        asset_key=asset_key,
        folder=artifact.folder,
        paths=paths,
        dvc=dvc,
        mlflow=mlflow,
        params=artifact.params,
        metrics=artifact.metrics,
        metadata={name: metadata_value(value, paths) for name, value in artifact.metadata.items()},
        texts=artifact.texts or None,
        series=artifact.series or None,
        artifacts=artifact.artifacts or None,
    )
    for path in artifact.cleanup:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)
    return result


def metadata_value(value: Any, paths: ProjectPaths) -> Any:
    """A stage's plain metadata value as Dagster metadata."""
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(str(value))
    if isinstance(value, Json):
        return dg.MetadataValue.json(value.value)
    if isinstance(value, Path):
        return dg.MetadataValue.path(paths.layout.relative(value))
    return value


def check_result(report, asset_key: dg.AssetKey | None = None) -> dg.AssetCheckResult:
    """A Great Expectations report (``quality.runner``) as a Dagster asset check result."""
    return dg.AssetCheckResult(
        asset_key=asset_key,
        passed=bool(report.success),
        metadata={
            "evaluated_expectations": report.evaluated,
            "failed_expectations": len(report.failures),
            "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in report.failures) or "none"),
        },
        description="; ".join(report.failures[:3]) or "all expectations met",
    )
