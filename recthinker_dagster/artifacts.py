"""The artifact layout on disk and its readers: one place for every stage, ``defs`` and ``serving``.

    layout = ArtifactLayout(Path("."))
    layout.asset_dir("interactions", "ml-1m")            # assets/interactions/ml-1m
    read_table(layout, "task_splits", "ml-1m", "tasks_eval.parquet")
    load_tool_indexes(layout, "ml-1m")
    tracked_md5(layout.asset_dir("sft_model"))            # the md5 in assets/sft_model.dvc

Every published artifact is a folder ``assets/<asset>/<dataset>`` (per-dataset assets) or
``assets/<asset>`` (shared ones), tracked by DVC through the pointer file next to it
(``<folder>.dvc``). Readers fail with a message naming the missing file and the asset to
materialize. Nothing here imports DVC: a pointer file is plain YAML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from recthinker_dagster.tools import ToolIndexes

TABLES = ("interactions", "items", "users")
TASK_SPLITS = ("train", "valid", "eval")

# index name in the domain code -> asset name (and folder under assets/)
INDEX_ASSETS = {
    "catalog": "item_catalog",
    "profiles": "user_profiles",
    "bprmf": "cf_model",
    "relations": "item_relations",
    "similar_users": "similar_users",
}


@dataclass(frozen=True)
class ArtifactLayout:
    """Where a project's raw data, published artifacts, work folders and caches live."""

    root: Path
    data_dir: Path | None = None  # None: <root>/data
    cache_dir: Path | None = None  # None: <root>/.cache

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(self.root) / "data"

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.root) / ".cache"

    def asset_dir(self, asset: str, dataset: str | None = None) -> Path:
        """``assets/<asset>/<dataset>`` for per-dataset assets, ``assets/<asset>`` otherwise."""
        base = Path(self.root) / "assets" / asset
        return base / dataset if dataset else base

    def work_dir(self, stage: str, *parts: str) -> Path:
        """``.work/<stage>/...``: resumable state of an unfinished run (never published)."""
        return Path(self.root).joinpath(".work", stage, *parts)

    @property
    def lock_dir(self) -> Path:
        """``.work/locks``: the per-artifact publication locks (``storage.artifact_locks``)."""
        return self.work_dir("locks")

    def relative(self, path: Path) -> str:
        """``path`` relative to the project root when inside it (artifacts never record machine paths)."""
        try:
            return str(Path(path).resolve().relative_to(Path(self.root).resolve()))
        except ValueError:
            return str(path)

    def resolve(self, recorded: str) -> Path:
        """A path recorded by :meth:`relative`, made absolute again."""
        path = Path(recorded)
        return path if path.is_absolute() else Path(self.root) / path


def key_prefix(dataset: str) -> str:
    """Asset-key-safe prefix of a dataset name: ``ml-1m`` -> ``ml_1m``."""
    return dataset.replace("-", "_").replace(".", "_")


def asset_label(asset: str, dataset: str | None = None) -> str:
    """How users name an asset (``ml_1m/interactions``), e.g. in 'materialize ... first'."""
    return f"{key_prefix(dataset)}/{asset}" if dataset else asset


def read_table(layout: ArtifactLayout, asset: str, dataset: str, filename: str | None = None) -> pl.DataFrame:
    """Read a published table; a clear error when its asset has not been materialized."""
    path = layout.asset_dir(asset, dataset) / (filename or f"{asset}.parquet")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {asset_label(asset, dataset)} first")
    return pl.read_parquet(path)


def read_tasks(layout: ArtifactLayout, dataset: str, splits: Iterable[str] = TASK_SPLITS) -> pl.DataFrame:
    """The task rows of ``splits`` (train, valid, eval), in that order."""
    return pl.concat([read_table(layout, "task_splits", dataset, f"tasks_{s}.parquet") for s in splits])


def read_train_interactions(layout: ArtifactLayout, dataset: str) -> pl.DataFrame:
    return read_table(layout, "task_splits", dataset, "train_interactions.parquet")


def read_published_jsonl(path: Path, asset: str) -> list[dict]:
    """The records of a published JSON-lines artifact, read only: a bad line is an error naming
    it (the artifact is never repaired in place; rematerialize ``asset``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {asset} first")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON trajectory ({error.msg}); "
                             f"rematerialize {asset}") from error
    return records


def read_teacher_trajectories(layout: ArtifactLayout, dataset: str) -> list[dict]:
    return read_published_jsonl(layout.asset_dir("teacher_trajectories", dataset) / "trajectories.jsonl",
                                asset_label("teacher_trajectories", dataset))


def read_kept_trajectories(layout: ArtifactLayout) -> list[dict]:
    """The published SFT set."""
    return read_published_jsonl(layout.asset_dir("filtered_trajectories") / "trajectories.jsonl",
                                "filtered_trajectories")


def read_lineage(layout: ArtifactLayout, asset: str) -> dict:
    """A trained policy's ``lineage.json`` (its base model and adapters, relative to the root)."""
    path = layout.asset_dir(asset) / "lineage.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {asset} first")
    return json.loads(path.read_text())


def index_folders(layout: ArtifactLayout, dataset: str) -> dict[str, Path]:
    return {name: layout.asset_dir(asset, dataset) for name, asset in INDEX_ASSETS.items()}


def load_tool_indexes(layout: ArtifactLayout, dataset: str) -> ToolIndexes:
    folders = index_folders(layout, dataset)
    missing = [str(f) for f in folders.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"tool indexes missing ({', '.join(missing)}): "
                                f"materialize {key_prefix(dataset)}/tool indexes first")
    return ToolIndexes.load(folders)


class DvcPointerError(ValueError):
    """A ``.dvc`` pointer file that is missing or does not hold an md5."""


def dvc_pointer(path: Path) -> Path:
    """The pointer file DVC writes next to a tracked file or folder."""
    path = Path(path)
    return path.with_name(path.name + ".dvc")


def read_dvc_md5(dvc_file: Path) -> str:
    """The md5 of the first output in a DVC pointer file (``outs: - md5: ...``)."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        raise DvcPointerError(f"{dvc_file} is missing (track it with `dvc add`)")
    try:
        content = yaml.safe_load(dvc_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DvcPointerError(f"{dvc_file} is malformed: not valid YAML ({error.__class__.__name__})") from None
    outs = content.get("outs") if isinstance(content, dict) else None
    if not isinstance(outs, list) or not outs or not isinstance(outs[0], dict):
        raise DvcPointerError(f"{dvc_file} is malformed: no 'outs' list")
    md5 = outs[0].get("md5")
    if not isinstance(md5, str) or not md5.strip():
        raise DvcPointerError(f"{dvc_file} is malformed: its first output has no md5")
    return md5.strip()


def tracked_md5(path: Path) -> str | None:
    """The md5 DVC recorded for ``path``; None when it is not tracked, an error when the pointer is malformed."""
    pointer = dvc_pointer(path)
    return read_dvc_md5(pointer) if pointer.is_file() else None
