"""Tool index assets (one DVC-tracked folder per index) and the leakage gate.

All five indexes are built in one step from the same index interactions (training-visible
interactions minus every task's own target), so they always agree with each other; the
``tool_suite`` asset records the tool schemas, and its blocking check proves that no
task's target reaches that task's tools. The same leakage report gates the indexes
before they are published: the stage audits the five staged folders together and swaps them
in only if no target leaks (``defs.publishing.audited``; a failure shows as a failed
``no_target_leakage`` evaluation). The work itself is in ``stages.indexes``.
"""

import dagster as dg

from recthinker_dagster.artifacts import INDEX_ASSETS, index_folders, key_prefix
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import ToolIndexesConfig
from recthinker_dagster.defs.publishing import Gate, audited, publication_lock, publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.indexes import build_tool_indexes_stage, build_tool_suite_stage, tool_leakage_report

INDEX_DOCS = {
    "catalog": "Item catalog with popularity, average rating and a BM25 text index (get_item_info, search_items).",
    "profiles": "Per-user preference profiles and histories (get_user_profile, search_user_history).",
    "bprmf": "The candidate scorers: BPR-MF (with validation NDCG), item-kNN and SASRec (score_candidates).",
    "relations": "Item-to-item co-occurrence neighbours (get_related_items).",
    "similar_users": "Nearest users by cosine over interactions, and what they liked (find_similar_users).",
}

LEAKAGE_CHECK = "no_target_leakage"


def build_tool_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    index_keys = {name: keys.dataset_key(dataset, asset) for name, asset in INDEX_ASSETS.items()}
    upstream = [keys.dataset_key(dataset, asset) for asset in ("task_splits", "items", "users")]
    suite_key = keys.dataset_key(dataset, "tool_suite")

    @dg.multi_asset(
        name=f"{prefix}__tool_indexes",
        specs=[
            dg.AssetSpec(key, deps=upstream, group_name=prefix, kinds={"numpy", "dvc"}, description=INDEX_DOCS[name])
            for name, key in index_keys.items()
        ],
    )
    def tool_indexes(
        context: dg.AssetExecutionContext,
        config: ToolIndexesConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ):
        leakage = dg.AssetCheckKey(suite_key, LEAKAGE_CHECK)
        gates = {folder: Gate(index_keys[name], leakage) for name, folder in index_folders(paths.layout, dataset).items()}
        with publication_lock(context, paths, gates):
            result = yield from audited(context, paths, gates, lambda: build_tool_indexes_stage(
                config.settings(), paths.layout, dataset, log=context.log.info
            ))
            for name, artifact in result.indexes.items():
                yield publish_artifact(context, index_keys[name], artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset(
        key=suite_key,
        deps=list(index_keys.values()),
        group_name=prefix,
        kinds={"dvc"},
        description="The tool registry as the agent sees it: JSON schemas of every tool, grouped by kind.",
    )
    def tool_suite(
        context: dg.AssetExecutionContext, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ) -> dg.MaterializeResult:
        with publication_lock(context, paths, [paths.asset_dir("tool_suite", dataset)]):
            artifact = build_tool_suite_stage(paths.layout, dataset)
            return publish_artifact(context, suite_key, artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset_check(
        asset=suite_key,
        name=LEAKAGE_CHECK,
        blocking=True,
        description=(
            "For every train, valid and eval task: the task's target is absent from its own user's data "
            "in every index and from the user-side tool outputs, and each index holds exactly the task's history."
        ),
    )
    def leakage_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        report = tool_leakage_report(paths.layout, dataset)
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
