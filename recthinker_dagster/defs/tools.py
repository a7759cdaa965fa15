"""Tool index assets (one DVC-tracked folder per index) and the leakage gate.

All five indexes are built in one step from the same index interactions (training-visible
interactions minus every task's own target), so they always agree with each other; the
``tool_suite`` asset records the tool schemas, and its blocking check proves that no
task's target reaches that task's tools.
"""

import json
import time

import dagster as dg
import polars as pl

from recthinker_dagster.defs.config import ToolIndexesConfig
from recthinker_dagster.defs.datasets import TASK_SPLITS, key_prefix, read_table
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.tools import (
    TOOL_GROUPS,
    Toolbox,
    ToolIndexConfig,
    ToolIndexes,
    build_all,
    index_interactions,
    leakage_report,
)

# index name in the domain code -> asset name (and folder under assets/)
INDEX_ASSETS = {
    "catalog": "item_catalog",
    "profiles": "user_profiles",
    "bprmf": "cf_model",
    "relations": "item_relations",
    "similar_users": "similar_users",
}

_DOCS = {
    "catalog": "Item catalog with popularity, average rating and a BM25 text index (get_item_info, search_items).",
    "profiles": "Per-user preference profiles and histories (get_user_profile, search_user_history).",
    "bprmf": "BPR-MF collaborative-filtering model in torch, with validation NDCG (score_candidates).",
    "relations": "Item-to-item co-occurrence neighbours (get_related_items).",
    "similar_users": "Nearest users by cosine over interactions, and what they liked (find_similar_users).",
}


def load_tasks(paths: ProjectPaths, dataset: str, splits=TASK_SPLITS) -> pl.DataFrame:
    return pl.concat([read_table(paths, "task_splits", dataset, f"tasks_{s}.parquet") for s in splits])


def index_folders(paths: ProjectPaths, dataset: str) -> dict:
    return {name: paths.asset_dir(asset, dataset) for name, asset in INDEX_ASSETS.items()}


def load_tool_indexes(paths: ProjectPaths, dataset: str) -> ToolIndexes:
    folders = index_folders(paths, dataset)
    missing = [str(f) for f in folders.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"tool indexes missing ({', '.join(missing)}): materialize {key_prefix(dataset)}/tool indexes first")
    return ToolIndexes.load(folders)


def build_tool_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    keys = {name: dg.AssetKey([prefix, asset]) for name, asset in INDEX_ASSETS.items()}
    upstream = [dg.AssetKey([prefix, "task_splits"]), dg.AssetKey([prefix, "items"]), dg.AssetKey([prefix, "users"])]
    suite_key = dg.AssetKey([prefix, "tool_suite"])

    @dg.multi_asset(
        name=f"{prefix}__tool_indexes",
        specs=[
            dg.AssetSpec(key, deps=upstream, group_name=prefix, kinds={"numpy", "dvc"}, description=_DOCS[name])
            for name, key in keys.items()
        ],
    )
    def tool_indexes(
        context: dg.AssetExecutionContext,
        config: ToolIndexesConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ):
        tasks = load_tasks(paths, dataset)
        visible = index_interactions(read_table(paths, "task_splits", dataset, "train_interactions.parquet"), tasks)
        index_config = ToolIndexConfig.from_dict(config.overrides())
        started = time.perf_counter()
        indexes = build_all(
            visible,
            read_table(paths, "items", dataset),
            read_table(paths, "users", dataset),
            tasks.filter(pl.col("split") == "valid"),
            index_config,
        )
        context.log.info(f"built {dataset} tool indexes in {time.perf_counter() - started:.1f}s: {indexes.build_seconds}")
        params = {"dataset": dataset, "index_interactions": visible.height, **_flat(index_config.to_dict())}
        for name, key in keys.items():
            folder = paths.asset_dir(INDEX_ASSETS[name], dataset)
            remove_stale_staging(folder.parent)
            with staged_directory(folder) as staging:
                getattr(indexes, name).save(staging)
            metrics = {"build_seconds": indexes.build_seconds[name], "index_interactions": visible.height}
            metadata = {"build_seconds": round(indexes.build_seconds[name], 2)}
            series = None
            if name == "bprmf":
                metrics.update({f"valid_{k}": v for k, v in indexes.bprmf.validation_metrics.items()})
                metadata["validation_metrics"] = dg.MetadataValue.json(indexes.bprmf.validation_metrics)
                series = {"train_loss": list(indexes.bprmf.losses)}
            yield publish(
                context,
                asset_key=key,
                folder=folder,
                paths=paths,
                dvc=dvc,
                mlflow=mlflow,
                params=params,
                metrics=metrics,
                metadata=metadata,
                series=series,
            )

    @dg.asset(
        key=suite_key,
        deps=list(keys.values()),
        group_name=prefix,
        kinds={"dvc"},
        description="The tool registry as the agent sees it: JSON schemas of every tool, grouped by kind.",
    )
    def tool_suite(
        context: dg.AssetExecutionContext, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ) -> dg.MaterializeResult:
        indexes = load_tool_indexes(paths, dataset)
        example_task = load_tasks(paths, dataset, ("eval",)).row(0, named=True)
        schemas = Toolbox(indexes, example_task).schemas()
        folder = paths.asset_dir("tool_suite", dataset)
        document = {"groups": dict(TOOL_GROUPS), "tools": schemas}
        with staged_directory(folder) as staging:
            (staging / "tools.json").write_text(json.dumps(document, indent=2))
        return publish(
            context,
            asset_key=suite_key,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"dataset": dataset},
            metrics={"tools": len(schemas)},
            metadata={
                "tools": dg.MetadataValue.md(
                    "\n".join(f"- `{s['function']['name']}`: {s['function']['description'].splitlines()[0]}" for s in schemas)
                )
            },
            texts={"tools.json": json.dumps(document, indent=2)},
        )

    @dg.asset_check(
        asset=suite_key,
        name="no_target_leakage",
        blocking=True,
        description=(
            "For every train, valid and eval task: the task's target is absent from its own user's data "
            "in every index and from the user-side tool outputs, and each index holds exactly the task's history."
        ),
    )
    def leakage_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        report = leakage_report(load_tool_indexes(paths, dataset), load_tasks(paths, dataset))
        return dg.AssetCheckResult(
            passed=bool(report["ok"]),
            metadata={
                "leaks": dg.MetadataValue.json(report["leaks"]),
                "mismatches": dg.MetadataValue.json(report["mismatches"]),
                "leaking_tasks": len(report["leaking_task_ids"]),
                "example_leaking_tasks": ", ".join(sorted(report["leaking_task_ids"])[:5]) or "none",
            },
        )

    return [tool_indexes, tool_suite, leakage_check]


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = value
    return out
