"""Turn a finished artifact folder into a versioned, tracked Dagster materialization.

Write-audit-publish, the Dagster side: an asset holds its folders' :func:`publication_lock`
from before its stage runs until DVC has added and pushed them, so a second run of the same
asset waits instead of interleaving its swap and ``dvc add`` (or sharing resumable work
files). The stage audits its staged output before the swap; :func:`audited` turns a failed
audit (``storage.AuditFailed``) into failed evaluations of the asset checks that gate those
folders, an observation on the asset, and a step failure listing the failed expectations;
the published folder, its ``.dvc`` pointer and the remote stay as they were.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import polars as pl

from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import AuditFailed, artifact_locks, folder_size_bytes

T = TypeVar("T")


@dataclass(frozen=True)
class Gate:
    """The asset a published folder belongs to, and the asset check that reports its audit."""

    asset_key: dg.AssetKey
    check: dg.AssetCheckKey | None = None


@contextmanager
def publication_lock(context: dg.AssetExecutionContext, paths: ProjectPaths, folders: Iterable[Path]) -> Iterator[None]:
    """Hold the inter-process locks of ``folders`` (``storage.artifact_locks``): wrap a stage
    call and its publication, so swap, ``dvc add`` and push of one artifact never interleave."""
    with artifact_locks(folders, paths.layout.lock_dir, log=context.log.info):
        yield


def audited(
    context: dg.AssetExecutionContext, paths: ProjectPaths, gates: Mapping[Path, Gate], build: Callable[[], T]
) -> Generator[dg.AssetObservation, None, T]:
    """Run ``build`` (a stage that audits its staged output); its result, or, when the audit
    fails, failed evaluations of the gates' checks and a step failure. Use with ``yield from``."""
    try:
        return build()
    except AuditFailed as failed:
        by_folder = {Path(folder).resolve(): gate for folder, gate in gates.items()}
        check_failures: dict[dg.AssetCheckKey, list[str]] = {}
        observed: dict[dg.AssetKey, str] = {}
        for rejection in failed.rejections.values():
            gate = by_folder.get(rejection.folder.resolve())
            if gate is None:
                continue
            observed[gate.asset_key] = paths.layout.relative(rejection.kept_at)
            if gate.check is not None and rejection.failures:  # folders staged with a failing one passed theirs
                listed = check_failures.setdefault(gate.check, [])
                listed += [f for f in rejection.failures if f not in listed]  # the index folders share one report
        failure = yield from report_rejection(context, failed, check_failures, observed)
        raise failure from failed


def report_rejection(
    context: dg.AssetExecutionContext,
    error: Exception,
    check_failures: Mapping[dg.AssetCheckKey, Sequence[str]],
    observed: Mapping[dg.AssetKey, str],
) -> Generator[dg.AssetObservation, None, dg.Failure]:
    """Log failed evaluations of ``check_failures``' checks, yield an observation per asset in
    ``observed`` (asset -> where its rejected output was kept, or "") so the events reach the
    run, and return the step failure to raise: its message lists the failed expectations."""
    for check, failures in check_failures.items():
        context.log_event(dg.AssetCheckEvaluation(
            asset_key=check.asset_key,
            check_name=check.name,
            passed=False,
            metadata={
                "failed_expectations": len(failures),
                "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failures)),
                "published_version": "unchanged: the audited output was rejected before the swap",
            },
            description="staged output rejected: " + "; ".join(failures[:3]),
        ))
    context.log.error(str(error))
    listing = dg.MetadataValue.md("\n".join(f"- {f}" for fs in check_failures.values() for f in fs) or str(error))
    for asset_key, kept_at in observed.items():
        yield dg.AssetObservation(asset_key=asset_key, metadata={
            "audit": "failed: not published", "failures": listing, "rejected_output": kept_at or "not kept"})
    return dg.Failure(description=str(error), metadata={"failures": listing})


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
    run_id: str | None = None,
) -> dg.MaterializeResult:
    """Add ``folder`` to DVC, log an MLflow run (or finish the attempt ``run_id``), and build
    the MaterializeResult.

    The DVC md5 is the asset's Dagster data version, an MLflow tag and a metadata entry,
    so any past version can be found from either UI and restored from the DVC cache.
    """
    started = time.perf_counter()
    key_path = "/".join(asset_key.path)
    with publication_lock(context, paths, [folder]):  # re-entrant: the asset usually holds it already
        version = dvc.track(folder)
        md5 = version["md5"]
        metrics = {**metrics, "artifact_bytes": folder_size_bytes(folder), "dvc_seconds": time.perf_counter() - started}
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
            run_id=run_id,
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


@contextmanager
def mlflow_attempt(context: dg.AssetExecutionContext, mlflow: MLflowTracking, asset_key: dg.AssetKey) -> Iterator[str]:
    """An MLflow run that is RUNNING while a long stage works (training): yields its id for
    :func:`publish_artifact`, marks it FAILED if the stage raises, and on start marks FAILED
    the earlier attempts of this asset whose process was killed."""
    key_path = "/".join(asset_key.path)
    run_id = mlflow.open_attempt(key_path, {"asset": key_path, "dagster_run_id": context.run.run_id})
    try:
        yield run_id
    except BaseException as error:
        mlflow.close_attempt(run_id, error)
        raise


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
    run_id: str | None = None,
) -> dg.MaterializeResult:
    """:func:`publish` a stage's artifact (finishing the MLflow attempt ``run_id`` if given),
    then delete the work files it no longer needs."""
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
        run_id=run_id,
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
