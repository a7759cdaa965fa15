"""Per-dataset assets: raw files, normalized tables and the evaluation protocol.

``build_dataset_assets("ml-1m")`` returns the assets and checks of one dataset under the
key prefix ``ml_1m``; the definitions module builds one set per configured dataset, so
the asset graph shows a parallel chain per dataset and each has its own versions.
"""


import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.data.sources import dataset_files, load_dataset
from recthinker_dagster.defs.config import IngestConfig, TaskSplitConfig
from recthinker_dagster.defs.publishing import preview, publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.protocol import (
    build_task_splits,
    group_sizes,
    protocol_config_for,
)
from recthinker_dagster.quality import (
    validate_interactions,
    validate_items,
    validate_tasks,
    validate_users,
)
from recthinker_dagster.storage import remove_stale_staging, staged_directory

TABLES = ("interactions", "items", "users")
TASK_SPLITS = ("train", "valid", "eval")


def key_prefix(dataset: str) -> str:
    """Dagster-safe prefix for a dataset name: ``ml-1m`` -> ``ml_1m``."""
    return dataset.replace("-", "_").replace(".", "_")


def files_md5(files: list[Path]) -> str:
    digest = hashlib.md5()
    for path in sorted(files):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_table(paths: ProjectPaths, asset: str, dataset: str, filename: str | None = None) -> pl.DataFrame:
    """Read a published table; a clear error when its asset has not been materialized."""
    path = paths.asset_dir(asset, dataset) / (filename or f"{asset}.parquet")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {key_prefix(dataset)}/{asset} first")
    return pl.read_parquet(path)


def _check_result(report, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
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


def build_dataset_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    raw_key = dg.AssetKey([prefix, "raw_dataset"])
    table_keys = {name: dg.AssetKey([prefix, name]) for name in TABLES}
    splits_key = dg.AssetKey([prefix, "task_splits"])

    @dg.asset(
        key=raw_key,
        group_name=prefix,
        kinds={"dvc"},
        description=f"The original {dataset} files in data/{dataset}/ (downloaded when absent), tracked by data.dvc.",
    )
    def raw_dataset(
        context: dg.AssetExecutionContext, config: IngestConfig, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ) -> dg.MaterializeResult:
        started = time.perf_counter()
        files = dataset_files(dataset, paths.data_path, allow_download=config.allow_download)
        md5 = files_md5(files) if files else "synthetic"
        tags = {"asset": "/".join(raw_key.path), "dagster_run_id": context.run.run_id, "files_md5": md5}
        data_dvc = ""
        if dvc.enabled and paths.data_path.is_relative_to(paths.root_path) and files:
            data_dvc = dvc.track(paths.data_path)["md5"]  # keeps data.dvc current when files were downloaded
            tags["dvc_md5"] = data_dvc
        sizes = {p.name: p.stat().st_size for p in files}
        run_id = mlflow.log_run(
            "/".join(raw_key.path),
            params={"dataset": dataset, "data_dir": str(paths.data_path), **config.model_dump()},
            metrics={"files": len(files), "bytes": sum(sizes.values()), "seconds": time.perf_counter() - started},
            tags=tags,
        )
        return dg.MaterializeResult(
            metadata={
                "files": dg.MetadataValue.json(sizes),
                "files_md5": md5,
                "data_dvc_md5": data_dvc,
                "mlflow_run_id": run_id,
            },
            data_version=dg.DataVersion(md5),
        )

    @dg.multi_asset(
        name=f"{prefix}__ingest",
        specs=[
            dg.AssetSpec(key, deps=[raw_key], group_name=prefix, kinds={"polars", "dvc"}, description=_TABLE_DOCS[name])
            for name, key in table_keys.items()
        ],
    )
    def ingest(
        context: dg.AssetExecutionContext, config: IngestConfig, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ):
        started = time.perf_counter()
        data, stats = load_dataset(dataset, paths.data_path, allow_download=config.allow_download, kcore=config.kcore)
        load_seconds = time.perf_counter() - started
        context.log.info(f"loaded {dataset} in {load_seconds:.1f}s: {stats}")
        frames = {"interactions": data.interactions, "items": data.items, "users": data.users}
        for name, frame in frames.items():
            folder = paths.asset_dir(name, dataset)
            remove_stale_staging(folder.parent)
            with staged_directory(folder) as staging:
                frame.write_parquet(staging / f"{name}.parquet")
            yield publish(
                context,
                asset_key=table_keys[name],
                folder=folder,
                paths=paths,
                dvc=dvc,
                mlflow=mlflow,
                params={"dataset": dataset, **config.model_dump()},
                metrics={"rows": frame.height, "load_seconds": load_seconds, **_numeric(stats)},
                metadata={
                    "rows": frame.height,
                    **_table_metadata(name, frame),
                    "cleaning": dg.MetadataValue.json(stats),
                    "preview": preview(frame),
                },
            )

    @dg.asset(
        key=splits_key,
        deps=[table_keys["interactions"], table_keys["items"]],
        group_name=prefix,
        kinds={"polars", "dvc"},
        description=(
            "Evaluation protocol: leave-last-out targets, sparse/dense groups, seeded candidate sets; "
            "train/valid/eval tasks and the training-visible interactions."
        ),
    )
    def task_splits(
        context: dg.AssetExecutionContext,
        config: TaskSplitConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        started = time.perf_counter()
        interactions = read_table(paths, "interactions", dataset)
        protocol = protocol_config_for(dataset, **config.overrides())
        splits = build_task_splits(interactions, protocol, dataset)
        population = group_sizes(interactions, protocol)
        seconds = time.perf_counter() - started
        folder = paths.asset_dir("task_splits", dataset)
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            splits.train_interactions.write_parquet(staging / "train_interactions.parquet")
            for split in TASK_SPLITS:
                splits.tasks.filter(pl.col("split") == split).write_parquet(staging / f"tasks_{split}.parquet")
            (staging / "protocol.json").write_text(json.dumps(_jsonable(protocol), indent=2, sort_keys=True))
        counts = splits.tasks.group_by("split", "group").len().sort("split", "group")
        count_metrics = {f"tasks_{r['split']}_{r['group']}": r["len"] for r in counts.iter_rows(named=True)}
        return publish(
            context,
            asset_key=splits_key,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"dataset": dataset, **_jsonable(protocol)},
            metrics={
                "tasks": splits.tasks.height,
                "train_interactions": splits.train_interactions.height,
                "build_seconds": seconds,
                **count_metrics,
                **{f"users_{group}": n for group, n in population.items()},
            },
            metadata={
                "tasks": splits.tasks.height,
                "train_interactions": splits.train_interactions.height,
                "tasks_by_split_and_group": dg.MetadataValue.md(counts.to_pandas().to_markdown(index=False)),
                "users_per_group": dg.MetadataValue.json(population),
                "protocol": dg.MetadataValue.json(_jsonable(protocol)),
                "preview": preview(splits.tasks.drop("history_item_ids")),
            },
            texts={"protocol.json": json.dumps(_jsonable(protocol), indent=2, sort_keys=True)},
        )

    checks = [_table_check(dataset, name, key) for name, key in table_keys.items()]

    @dg.asset_check(asset=splits_key, name="protocol_quality", blocking=True, description=_SPLITS_CHECK_DOC)
    def splits_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        tasks = pl.concat([read_table(paths, "task_splits", dataset, f"tasks_{s}.parquet") for s in TASK_SPLITS])
        train_interactions = read_table(paths, "task_splits", dataset, "train_interactions.parquet")
        interactions = read_table(paths, "interactions", dataset)
        protocol = json.loads((paths.asset_dir("task_splits", dataset) / "protocol.json").read_text())
        report = validate_tasks(tasks, train_interactions, interactions, protocol["n_candidates"])
        return _check_result(report, splits_key)

    return [raw_dataset, ingest, task_splits, *checks, splits_check]


_VALIDATORS = {"interactions": validate_interactions, "items": validate_items, "users": validate_users}

_TABLE_DOCS = {
    "interactions": "All interactions in the normalized schema: user_id, item_id, rating, timestamp, order.",
    "items": "Item catalog: title, year, categories, creator, description, has_metadata.",
    "users": "Users: gender, age, occupation, zip_code, has_demographics.",
}

_SPLITS_CHECK_DOC = (
    "Great Expectations suite on the tasks: schema, unique ids, candidate validity "
    "(target once, distinct, negatives never in the user's history) and no leakage of "
    "validation/test targets into the training-visible interactions. Blocking."
)


def _table_check(dataset: str, name: str, key: dg.AssetKey):
    @dg.asset_check(
        asset=key,
        name=f"{name}_quality",
        blocking=True,
        description=f"Great Expectations suite on {name}: schema, nulls, ranges and duplicates. Blocking.",
    )
    def table_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        return _check_result(_VALIDATORS[name](read_table(paths, name, dataset)), key)

    return table_check


def _table_metadata(name: str, frame: pl.DataFrame) -> dict:
    if name == "interactions":
        return {
            "users": frame["user_id"].n_unique(),
            "items": frame["item_id"].n_unique(),
            "rating_mean": round(float(frame["rating"].mean() or 0.0), 3),
        }
    if name == "items":
        return {"with_metadata": int(frame["has_metadata"].sum()), "without_metadata": int((~frame["has_metadata"]).sum())}
    return {"with_demographics": int(frame["has_demographics"].sum())}


def _numeric(stats: dict) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _jsonable(obj) -> dict:
    from dataclasses import asdict, is_dataclass

    data = asdict(obj) if is_dataclass(obj) else dict(obj)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}
