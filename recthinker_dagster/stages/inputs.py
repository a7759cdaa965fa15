"""The data side of a project, built on demand: what scripts need before they measure anything.

    ensure_tool_inputs(profile, layout, "ml-1m")    # tables, task splits and tool indexes under layout

Each stage runs only when its published folder is missing, so a layout that already holds the
pipeline's artifacts (``dvc pull``) is read as it is. Nothing is downloaded: raw files must be
under the layout's data folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from recthinker_dagster.artifacts import ArtifactLayout, index_folders
from recthinker_dagster.settings import Profile
from recthinker_dagster.stages.indexes import build_tool_indexes_stage
from recthinker_dagster.stages.ingest import build_ingest_stage
from recthinker_dagster.stages.splits import build_task_splits_stage


def quiet(_: str) -> None:
    """A ``log`` that discards the stages' progress lines."""


def ensure_tasks(profile: Profile, layout: ArtifactLayout, dataset: str, log: Callable[[str], None] = quiet) -> None:
    """Ingest the raw files and build the task splits into ``layout`` unless it already holds the tasks."""
    if not layout.asset_dir("task_splits", dataset).exists():
        build_ingest_stage(replace(profile.ingest, allow_download=False), layout, dataset, log=log)
        build_task_splits_stage(profile.protocol, layout, dataset, log=log)


def ensure_tool_inputs(profile: Profile, layout: ArtifactLayout, dataset: str,
                       log: Callable[[str], None] = quiet) -> None:
    """:func:`ensure_tasks`, then the tool indexes unless ``layout`` already holds all of them."""
    ensure_tasks(profile, layout, dataset, log)
    if not all(folder.exists() for folder in index_folders(layout, dataset).values()):
        build_tool_indexes_stage(profile.tool_indexes, layout, dataset, log=log)
