"""Atomic publication of artifact folders.

An artifact is built in a hidden sibling folder and swapped into place only when it is
complete, so an interrupted or failing run never leaves a half-written artifact and the
previous good version stays where it was until the new one is whole.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(final_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``final_dir`` atomically.

    On any exception the staging folder is removed and ``final_dir`` is untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = final_dir.parent / f".{final_dir.name}.staging-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final_dir.parent / f".{final_dir.name}.retired-{token}"
    had_previous = final_dir.exists()
    if had_previous:
        os.replace(final_dir, retired)
    try:
        os.replace(staging, final_dir)
    except BaseException:
        if had_previous:
            os.replace(retired, final_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete staging/retired folders left behind by killed processes under ``parent``."""
    removed: list[Path] = []
    if not Path(parent).is_dir():
        return removed
    for path in Path(parent).iterdir():
        if path.name.startswith(".") and (".staging-" in path.name or ".retired-" in path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
