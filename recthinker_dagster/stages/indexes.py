"""Tool index stages: the five indexes behind the agent's tools, the tool suite, the leakage report.

    result = build_tool_indexes_stage(ToolIndexSettings(), layout, "ml-1m")  # one folder per index
    suite = build_tool_suite_stage(layout, "ml-1m")                          # assets/tool_suite/ml-1m/tools.json
    report = tool_leakage_report(layout, "ml-1m")                            # report["ok"]: no target leaks

All five indexes are built in one step from the same index interactions (training-visible
interactions minus every task's own target), so they always agree with each other. They are
published by write-audit-publish: the five folders are staged, the leakage report (the gate
behind ``tool_suite``'s ``no_target_leakage`` check) runs on the staged indexes, and only if
no task's target reaches its tools are the five swapped in (else ``storage.AuditFailed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recthinker_dagster.artifacts import (
    INDEX_ASSETS,
    ArtifactLayout,
    load_tool_indexes,
    read_table,
    read_tasks,
    read_train_interactions,
)
from recthinker_dagster.settings import ToolIndexSettings
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directories, staged_directory
from recthinker_dagster.tools import TOOL_GROUPS, Toolbox, ToolIndexes, build_all, index_interactions, leakage_report


@dataclass
class ToolIndexesResult:
    indexes: dict[str, StageArtifact]  # index name (``INDEX_ASSETS`` keys) -> its published folder
    index_interactions: int  # rows every index was built from


def build_tool_indexes_stage(
    settings: ToolIndexSettings, layout: ArtifactLayout, dataset: str, log: Callable[[str], None] = print
) -> ToolIndexesResult:
    """Build the five indexes from the published protocol and tables; publish them together,
    only if the staged indexes pass :func:`leakage_failures`."""
    tasks = read_tasks(layout, dataset)
    visible = index_interactions(read_train_interactions(layout, dataset), tasks)
    index_config = settings.index_config()
    started = time.perf_counter()
    indexes = build_all(
        visible,
        read_table(layout, "items", dataset),
        read_table(layout, "users", dataset),
        tasks.filter(pl.col("split") == "valid"),
        index_config,
    )
    log(f"built {dataset} tool indexes in {time.perf_counter() - started:.1f}s: {indexes.build_seconds}")
    params = {"dataset": dataset, "index_interactions": visible.height, **flatten(index_config.to_dict())}
    folders = {name: layout.asset_dir(asset, dataset) for name, asset in INDEX_ASSETS.items()}
    for folder in folders.values():
        remove_stale_staging(folder.parent)

    def audit(staged: Mapping[str, Path]) -> dict[str, list[str]]:
        audit_started = time.perf_counter()
        failures = leakage_failures(leakage_report(ToolIndexes.load(staged), tasks))
        log(f"leakage audit of the staged {dataset} indexes over {tasks.height} tasks: "
            f"{'failed' if failures else 'passed'} in {time.perf_counter() - audit_started:.1f}s")
        return {name: failures for name in staged}  # the report is about the five together

    with staged_directories(folders, audit=audit, lock_dir=layout.lock_dir) as staging:
        for name, folder in staging.items():
            indexes.save_index(name, folder)
    artifacts = {}
    for name, folder in folders.items():
        parts = (name, "itemknn", "sasrec") if name == "bprmf" else (name,)  # cf_model holds all three scorers
        seconds = sum(indexes.build_seconds.get(part, 0.0) for part in parts)
        artifact = StageArtifact(
            folder=folder,
            params=params,
            metrics={"build_seconds": seconds, "index_interactions": visible.height},
            metadata={"build_seconds": round(seconds, 2)},
        )
        if name == "bprmf":  # the only trained index: its validation scores and loss curve
            artifact.metrics.update({f"valid_{k}": v for k, v in indexes.bprmf.validation_metrics.items()})
            artifact.metadata["validation_metrics"] = Json(indexes.bprmf.validation_metrics)
            artifact.series["train_loss"] = list(indexes.bprmf.losses)
        artifacts[name] = artifact
    return ToolIndexesResult(artifacts, visible.height)


def build_tool_suite_stage(layout: ArtifactLayout, dataset: str) -> StageArtifact:
    """The tool registry as the agent sees it: every tool's JSON schema, grouped by kind."""
    indexes = load_tool_indexes(layout, dataset)
    example_task = read_tasks(layout, dataset, ("eval",)).row(0, named=True)
    schemas = Toolbox(indexes, example_task).schemas()
    document = json.dumps({"groups": dict(TOOL_GROUPS), "tools": schemas}, indent=2)
    folder = layout.asset_dir("tool_suite", dataset)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        (staging / "tools.json").write_text(document)
    listing = "\n".join(f"- `{s['function']['name']}`: {s['function']['description'].splitlines()[0]}" for s in schemas)
    return StageArtifact(
        folder=folder,
        params={"dataset": dataset},
        metrics={"tools": len(schemas)},
        metadata={"tools": Markdown(listing)},
        texts={"tools.json": document},
    )


def tool_leakage_report(layout: ArtifactLayout, dataset: str) -> dict:
    """``leakage_report`` over the published indexes and every task: ``ok``, ``leaks``,
    ``mismatches`` and ``leaking_task_ids`` (see ``tools.leakage``)."""
    return leakage_report(load_tool_indexes(layout, dataset), read_tasks(layout, dataset))


def leakage_failures(report: dict) -> list[str]:
    """A leakage report as failure lines (empty when ``report["ok"]``)."""
    if report["ok"]:
        return []
    examples = ", ".join(report["leaking_task_ids"][:3] + report["mismatched_task_ids"][:3])
    lines = [f"no_target_leakage: {n} tasks whose target reaches their tools via {check}"
             for check, n in report["leaks"].items() if n]
    lines += [f"no_target_leakage: {n} tasks whose {check} differs from the task's history"
              for check, n in report["mismatches"].items() if n]
    if not report["consistency"]["ok"]:
        lines.append(f"no_target_leakage: the indexes were not built from the same interactions: "
                     f"{report['consistency']['n_interactions']}")
    return [*lines, f"e.g. tasks {examples}"] if examples else lines or ["no_target_leakage: failed"]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as flat params: ``{"bpr": {"dim": 64}}`` -> ``{"bpr_dim": 64}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = value
    return out
