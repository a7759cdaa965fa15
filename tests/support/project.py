"""A throwaway RecThinker project (DVC repo, MLflow store, data folder) for Dagster tests."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths
from tests.support.paths import CACHE_DIR, require_shared


@dataclass
class Project:
    root: Path
    resources: dict

    @property
    def paths(self) -> ProjectPaths:
        return self.resources["paths"]

    @property
    def tracking_uri(self) -> str:
        return self.resources["mlflow"].tracking_uri


def make_project(root: Path) -> Project:
    """A DVC repository (local remote), an MLflow SQLite store and the project's resources under ``root``."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo:
        with repo.config.edit() as conf:
            conf["remote"]["local"] = {"url": str(root / "dvc_remote")}
            conf["core"]["remote"] = "local"
    return open_project(root)


def open_project(root: Path) -> Project:
    """The resources of a project :func:`make_project` made (another process can open it again)."""
    resources = {
        "paths": ProjectPaths(root=str(root), data_dir=str(root / "data"), cache_dir=str(CACHE_DIR)),
        "dvc": DVCVersioning(root=str(root)),
        "mlflow": MLflowTracking(
            tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", artifact_root=str(root / "mlflow" / "artifacts")
        ),
    }
    return Project(root, resources)


def write_small_movielens(folder: Path, n_lines: int = 4000) -> None:
    """The first ``n_lines`` real ML-1M ratings plus the full movies and users files (skips without them)."""
    sources = {name: require_shared("ml-1m", f"{name}.gz") for name in ("ratings.dat", "movies.dat", "users.dat")}
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(sources["ratings.dat"], "rb") as handle:
        lines = [next(handle) for _ in range(n_lines)]
    (folder / "ratings.dat").write_bytes(b"".join(lines))
    for name in ("movies.dat", "users.dat"):
        (folder / name).write_bytes(gzip.decompress(sources[name].read_bytes()))


def run_config(dataset: str, profile: str = "smoke", with_tools: bool = False, **task_overrides) -> dg.RunConfig:
    from recthinker_dagster.artifacts import key_prefix
    from recthinker_dagster.defs.config import IngestConfig, TaskSplitConfig, ToolIndexesConfig

    prefix = key_prefix(dataset)
    ops = {
        f"{prefix}__raw_dataset": IngestConfig(profile=profile, allow_download=False),
        f"{prefix}__ingest": IngestConfig(profile=profile, allow_download=False),
        f"{prefix}__task_splits": TaskSplitConfig(profile=profile, **task_overrides),
    }
    if with_tools:
        ops[f"{prefix}__tool_indexes"] = ToolIndexesConfig(profile=profile, bpr_epochs=2)
    return dg.RunConfig(ops=ops)
