"""Ingestion stages: hash the raw files, then normalize them into the three tables.

    raw = build_raw_dataset_stage(IngestSettings(), layout, "ml-1m")    # the files and their md5
    result = build_ingest_stage(IngestSettings(), layout, "ml-1m")      # assets/{interactions,items,users}/ml-1m
    report = validate_published_table(layout, "ml-1m", "interactions")  # Great Expectations suite

Each table is written atomically to its own folder (``assets/<table>/<dataset>/<table>.parquet``)
and returned as one :class:`StageArtifact` carrying the cleaning statistics. Versioning the
raw ``data/`` folder (``dvc add data``) is left to the caller.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recthinker_dagster.artifacts import TABLES, ArtifactLayout, read_table
from recthinker_dagster.data.sources import dataset_files, load_dataset
from recthinker_dagster.quality import validate_interactions, validate_items, validate_users
from recthinker_dagster.settings import IngestSettings
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory

# Looked up at call time, so a test can swap one suite for a failing one.
TABLE_VALIDATORS = {"interactions": validate_interactions, "items": validate_items, "users": validate_users}


@dataclass
class RawDataset:
    """The original files of a dataset (none for ``synthetic``) and their combined md5."""

    files: list[Path]
    files_md5: str
    seconds: float
    params: dict[str, Any]

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
    """Locate (downloading when allowed) the files ``dataset`` is read from and hash them."""
    started = time.perf_counter()
    files = dataset_files(dataset, layout.data_path, allow_download=settings.allow_download)
    return RawDataset(
        files=files,
        files_md5=files_md5(files) if files else "synthetic",
        seconds=time.perf_counter() - started,
        params={"dataset": dataset, "data_dir": str(layout.data_path), **(extra_params or {}), **asdict(settings)},
    )


def build_ingest_stage(
    settings: IngestSettings,
    layout: ArtifactLayout,
    dataset: str,
    log: Callable[[str], None] = print,
    extra_params: Mapping[str, Any] | None = None,
) -> IngestResult:
    """Load and clean ``dataset``, then write each table to its folder atomically.

    ``extra_params`` (e.g. the profile name) are recorded with every table's params.
    """
    started = time.perf_counter()
    data, stats = load_dataset(
        dataset, layout.data_path, allow_download=settings.allow_download, kcore=settings.kcore
    )
    load_seconds = time.perf_counter() - started
    log(f"loaded {dataset} in {load_seconds:.1f}s: {stats}")
    frames = {"interactions": data.interactions, "items": data.items, "users": data.users}
    params = {"dataset": dataset, **(extra_params or {}), **asdict(settings)}
    tables = {}
    for name in TABLES:
        frame = frames[name]
        folder = layout.asset_dir(name, dataset)
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            frame.write_parquet(staging / f"{name}.parquet")
        tables[name] = StageArtifact(
            folder=folder,
            params=params,
            metrics={"rows": frame.height, "load_seconds": load_seconds, **numeric(stats)},
            metadata={
                "rows": frame.height,
                **table_metadata(name, frame),
                "cleaning": Json(stats),
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
        return {"with_metadata": int(frame["has_metadata"].sum()), "without_metadata": int((~frame["has_metadata"]).sum())}
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
