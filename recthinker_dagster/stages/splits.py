"""The evaluation protocol stage: train/valid/eval tasks and the training-visible interactions.

    result = build_task_splits_stage(ProtocolSettings(), layout, "ml-1m")
    report = validate_published_splits(layout, "ml-1m")   # the blocking quality suite

Writes ``assets/task_splits/<dataset>/``: ``train_interactions.parquet``,
``tasks_{train,valid,eval}.parquet`` and ``protocol.json`` (the resolved protocol), by
write-audit-publish: the suite runs on the staged folder, which is swapped in only if it
passes (else ``storage.AuditFailed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recthinker_dagster.artifacts import TASK_SPLITS, ArtifactLayout, asset_label, read_table
from recthinker_dagster.protocol import ProtocolConfig, build_task_splits, group_sizes
from recthinker_dagster.quality import QualityResult, validate_tasks
from recthinker_dagster.settings import ProtocolSettings
from recthinker_dagster.stages.ingest import jsonable, markdown_preview
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory


@dataclass
class SplitsResult:
    artifact: StageArtifact
    protocol: ProtocolConfig
    tasks: int
    train_interactions: int


def build_task_splits_stage(
    settings: ProtocolSettings, layout: ArtifactLayout, dataset: str, log: Callable[[str], None] = print
) -> SplitsResult:
    """Build the protocol's tasks from the published interactions; publish them only if the
    staged folder passes :func:`validate_splits_folder`."""
    started = time.perf_counter()
    interactions = read_table(layout, "interactions", dataset)
    protocol = settings.for_dataset(dataset)
    splits = build_task_splits(interactions, protocol, dataset)
    population = group_sizes(interactions, protocol)
    seconds = time.perf_counter() - started
    folder = layout.asset_dir("task_splits", dataset)
    remove_stale_staging(folder.parent)
    protocol_json = json.dumps(jsonable(protocol), indent=2, sort_keys=True)
    reports: list[QualityResult] = []

    def audit(staged: Path) -> list[str]:
        reports.append(validate_splits_folder(staged, layout, dataset))
        return reports[-1].failures or ([] if reports[-1].success else ["failed"])

    with staged_directory(folder, audit=audit, lock_dir=layout.lock_dir) as staging:
        splits.train_interactions.write_parquet(staging / "train_interactions.parquet")
        for split in TASK_SPLITS:
            splits.tasks.filter(pl.col("split") == split).write_parquet(staging / f"tasks_{split}.parquet")
        (staging / "protocol.json").write_text(protocol_json)
    counts = splits.tasks.group_by("split", "group").len().sort("split", "group")
    log(f"{dataset}: {splits.tasks.height} tasks, {splits.train_interactions.height} training-visible interactions")
    artifact = StageArtifact(
        folder=folder,
        params={"dataset": dataset, **jsonable(protocol)},
        metrics={
            "tasks": splits.tasks.height,
            "train_interactions": splits.train_interactions.height,
            "build_seconds": seconds,
            **{f"tasks_{r['split']}_{r['group']}": r["len"] for r in counts.iter_rows(named=True)},
            **{f"users_{group}": n for group, n in population.items()},
        },
        metadata={
            "tasks": splits.tasks.height,
            "train_interactions": splits.train_interactions.height,
            "tasks_by_split_and_group": Markdown(counts.to_pandas().to_markdown(index=False)),
            "users_per_group": Json(population),
            "protocol": Json(jsonable(protocol)),
            "audit": f"{reports[-1].evaluated} expectations passed on the staged tasks",
            "preview": markdown_preview(splits.tasks.drop("history_item_ids")),
        },
        texts={"protocol.json": protocol_json},
    )
    return SplitsResult(artifact, protocol, splits.tasks.height, splits.train_interactions.height)


def validate_published_splits(layout: ArtifactLayout, dataset: str) -> QualityResult:
    """The Great Expectations report of the published tasks (:func:`validate_splits_folder`)."""
    return validate_splits_folder(layout.asset_dir("task_splits", dataset), layout, dataset)


def validate_splits_folder(folder: Path, layout: ArtifactLayout, dataset: str) -> QualityResult:
    """The Great Expectations report of the tasks in ``folder`` (published or staged): schema,
    unique ids, candidate validity and no leakage of validation/test targets into the
    training-visible interactions (checked against the published interactions)."""
    for name in ("protocol.json", "train_interactions.parquet", *(f"tasks_{s}.parquet" for s in TASK_SPLITS)):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing: materialize {asset_label('task_splits', dataset)} first")
    protocol = json.loads((folder / "protocol.json").read_text())
    return validate_tasks(
        pl.concat([pl.read_parquet(folder / f"tasks_{split}.parquet") for split in TASK_SPLITS]),
        pl.read_parquet(folder / "train_interactions.parquet"),
        read_table(layout, "interactions", dataset),
        protocol["n_candidates"],
    )
