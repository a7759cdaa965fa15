"""Ingestion stages: hash the raw files, then normalize them into the three tables.

    raw = build_raw_dataset_stage(IngestSettings(), layout, "ml-1m")    # the files, their md5, validated
    validate_data_folder(IngestSettings(), layout, validated=["ml-1m"])  # the other datasets under data/
    result = build_ingest_stage(IngestSettings(), layout, "ml-1m")      # assets/{interactions,items,users}/ml-1m
    report = validate_published_table(layout, "ml-1m", "interactions")  # Great Expectations suite

The raw files are parsed and run through the table suites before anyone versions them:
:func:`build_raw_dataset_stage` raises :class:`RawDataRejected` (and a parse error names the
file and line), so the caller runs ``dvc add data`` only on validated files. Versioning
``data/`` (all datasets at once) is the caller's job, after :func:`validate_data_folder`.

Each table is written to its own folder (``assets/<table>/<dataset>/<table>.parquet``) by
write-audit-publish: the three are staged, each staged table runs its Great Expectations
suite, and only if all three pass are they swapped in (``storage.staged_directories``); else
``storage.AuditFailed`` names the failed expectations and where the staged tables were kept.
Each is returned as one :class:`StageArtifact` carrying the cleaning statistics.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from recthinker_dagster.artifacts import TABLES, ArtifactLayout, read_table
from recthinker_dagster.data.errors import DatasetNotFoundError
from recthinker_dagster.data.notes import warning_lines
from recthinker_dagster.data.sources import DATASETS, dataset_files, load_dataset
from recthinker_dagster.quality import QualityResult, validate_interactions, validate_items, validate_users
from recthinker_dagster.settings import IngestSettings
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directories

# Looked up at call time, so a test can swap one suite for a failing one.
TABLE_VALIDATORS = {"interactions": validate_interactions, "items": validate_items, "users": validate_users}


class RawDataRejected(ValueError):
    """Raw files that parse but fail a table suite: they must not be versioned."""

    def __init__(self, dataset: str, reports: Mapping[str, QualityResult], files: Sequence[str] = ()):
        self.dataset = dataset
        self.reports = {name: report for name, report in reports.items() if not report.success}
        read = f" ({', '.join(files)})" if files else ""
        lines = [f"the raw files of {dataset}{read} fail the table suites; they were not versioned (data.dvc unchanged):"]
        for name, report in self.reports.items():
            lines.extend(f"  {name}: {failure}" for failure in report.failures)
        super().__init__("\n".join(lines))


@dataclass
class RawDataset:
    """The original files of a dataset (none for ``synthetic``), their combined md5, and the
    table suites' verdict on them (all passed, else the stage raised)."""

    files: list[Path]
    files_md5: str
    seconds: float
    params: dict[str, Any]
    validated_rows: dict[str, int]  # table -> rows that passed its suite

    @property
    def sizes(self) -> dict[str, int]:
        return {path.name: path.stat().st_size for path in self.files}

    @property
    def metrics(self) -> dict[str, float]:
        return {"files": len(self.files), "bytes": sum(self.sizes.values()), "seconds": self.seconds}


@dataclass
class IngestResult:
    tables: dict[str, StageArtifact]  # table name -> its published folder
    stats: dict[str, Any]  # load_dataset's cleaning statistics
    load_seconds: float


def build_raw_dataset_stage(
    settings: IngestSettings, layout: ArtifactLayout, dataset: str, extra_params: Mapping[str, Any] | None = None
) -> RawDataset:
    """Locate (downloading when allowed) the files ``dataset`` is read from, hash them, then
    parse them and run the table suites: :class:`RawDataRejected` when a suite fails."""
    started = time.perf_counter()
    files = dataset_files(dataset, layout.data_path, allow_download=settings.allow_download)
    rows = validate_raw_files(settings, layout, dataset)
    return RawDataset(
        files=files,
        files_md5=files_md5(files) if files else "synthetic",
        seconds=time.perf_counter() - started,
        params={"dataset": dataset, "data_dir": str(layout.data_path), **(extra_params or {}), **asdict(settings)},
        validated_rows=rows,
    )


def validate_raw_files(settings: IngestSettings, layout: ArtifactLayout, dataset: str) -> dict[str, int]:
    """Parse and clean ``dataset``'s files (a parse error names file and line), run the table
    suites on the result; the rows per table, or :class:`RawDataRejected`."""
    data, stats = load_dataset(dataset, layout.data_path, allow_download=settings.allow_download, kcore=settings.kcore,
                           metadata_warn_share=settings.metadata_warn_share, metadata_min_share=settings.metadata_min_share)
    frames = {"interactions": data.interactions, "items": data.items, "users": data.users}
    reports = audit_tables(frames)
    if not all(report.success for report in reports.values()):
        raise RawDataRejected(dataset, reports, [Path(f).name for f in stats.get("files", [])])
    return {name: frame.height for name, frame in frames.items()}


def validate_data_folder(settings: IngestSettings, layout: ArtifactLayout, validated: Sequence[str] = ()) -> list[str]:
    """Validate every registered dataset whose files are in the data folder, except those in
    ``validated``: ``dvc add data`` versions them all, so all must pass. The datasets checked."""
    checked = []
    for name in DATASETS:
        if name in validated:
            continue
        try:
            if not dataset_files(name, layout.data_path, allow_download=False):
                continue  # no files (synthetic): nothing to version
        except DatasetNotFoundError:
            continue
        validate_raw_files(replace(settings, allow_download=False), layout, name)
        checked.append(name)
    return checked


def audit_tables(frames: Mapping[str, pl.DataFrame]) -> dict[str, QualityResult]:
    """Each table's Great Expectations report (the suite is looked up in ``TABLE_VALIDATORS``)."""
    return {name: TABLE_VALIDATORS[name](frame) for name, frame in frames.items()}


def build_ingest_stage(
    settings: IngestSettings,
    layout: ArtifactLayout,
    dataset: str,
    log: Callable[[str], None] = print,
    extra_params: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> IngestResult:
    """Load and clean ``dataset``, then write-audit-publish its three tables: staged, each
    audited by its suite, swapped in only when all three pass (else ``storage.AuditFailed``).

    ``extra_params`` (e.g. the profile name) are recorded with every table's params. Every
    cleaning action and a low metadata share go to ``warn`` (default: ``log``), one line each.
    """
    started = time.perf_counter()
    data, stats = load_dataset(
        dataset, layout.data_path, allow_download=settings.allow_download, kcore=settings.kcore,
        metadata_warn_share=settings.metadata_warn_share, metadata_min_share=settings.metadata_min_share,
    )
    load_seconds = time.perf_counter() - started
    log(f"loaded {dataset} in {load_seconds:.1f}s: {stats}")
    for line in warning_lines(stats):
        (warn or log)(line)
    frames = {"interactions": data.interactions, "items": data.items, "users": data.users}
    params = {"dataset": dataset, **(extra_params or {}), **asdict(settings)}
    folders = {name: layout.asset_dir(name, dataset) for name in TABLES}
    for folder in folders.values():
        remove_stale_staging(folder.parent)
    reports: dict[str, QualityResult] = {}

    def audit(staged: Mapping[str, Path]) -> dict[str, list[str]]:
        reports.update(audit_tables({name: pl.read_parquet(staged[name] / f"{name}.parquet") for name in TABLES}))
        return {name: report.failures or ([] if report.success else ["failed"]) for name, report in reports.items()}

    with staged_directories(folders, audit=audit, lock_dir=layout.lock_dir) as staging:
        for name in TABLES:
            frames[name].write_parquet(staging[name] / f"{name}.parquet")
    tables = {}
    for name in TABLES:
        frame = frames[name]
        tables[name] = StageArtifact(
            folder=folders[name],
            params=params,
            metrics={"rows": frame.height, "load_seconds": load_seconds, **numeric(stats)},
            metadata={
                "rows": frame.height,
                **table_metadata(name, frame),
                "cleaning": Json(stats),
                "cleaning_warnings": Markdown("\n".join(f"- {line}" for line in warning_lines(stats)) or "none"),
                "audit": f"{reports[name].evaluated} expectations passed on the staged table",
                "preview": markdown_preview(frame),
            },
        )
    return IngestResult(tables=tables, stats=stats, load_seconds=load_seconds)


def validate_published_table(layout: ArtifactLayout, dataset: str, name: str):
    """The Great Expectations report of a published table (schema, nulls, ranges, duplicates)."""
    return TABLE_VALIDATORS[name](read_table(layout, name, dataset))


def files_md5(files: list[Path]) -> str:
    """One md5 over the names and bytes of ``files`` (order-independent)."""
    digest = hashlib.md5()
    for path in sorted(files):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def table_metadata(name: str, frame: pl.DataFrame) -> dict[str, Any]:
    """A few counts that say what a table holds."""
    if name == "interactions":
        return {
            "users": frame["user_id"].n_unique(),
            "items": frame["item_id"].n_unique(),
            "rating_mean": round(float(frame["rating"].mean() or 0.0), 3),  # type: ignore[arg-type]  # a float column
        }
    if name == "items":
        with_metadata = int(frame["has_metadata"].sum())
        share = round(with_metadata / frame.height, 4) if frame.height else 0.0
        return {"with_metadata": with_metadata, "without_metadata": frame.height - with_metadata, "metadata_share": share}
    return {"with_demographics": int(frame["has_demographics"].sum())}


def numeric(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``stats`` as floats (booleans excluded): loggable as metrics."""
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def jsonable(obj: Any) -> dict[str, Any]:
    """A dataclass or mapping as a JSON-ready dict (tuples become lists)."""
    data = asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else dict(obj)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}


def markdown_preview(frame: pl.DataFrame, rows: int = 5) -> Markdown:
    """The first ``rows`` rows as a Markdown table (list cells shortened to 5 entries)."""
    head = frame.head(rows).with_columns(
        [pl.col(c).cast(pl.List(pl.Utf8)).list.head(5).list.join(", ") for c, t in frame.schema.items() if isinstance(t, pl.List)]
    )
    return Markdown(head.to_pandas().to_markdown(index=False))
