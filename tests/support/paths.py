"""Where the repository, the shared data sets and the download cache are: the one definition.

``SHARED_DATA`` is ``$RECTHINKER_SHARED_DATA``, else ``<repo>/../shared/data``; ``CACHE_DIR`` is
``$RECTHINKER_CACHE_DIR``, else ``<repo>/.cache`` (where the offline model wheel lives).
Tests that need a path prefer the ``repo_root`` / ``shared_data`` fixtures of ``conftest.py``;
module-level constants (``skipif`` conditions, parametrize lists) import from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recthinker_dagster.models.base_model import default_cache_dir

SHARED_DATA_ENV = "RECTHINKER_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
FIXTURES_DIR = TESTS_DIR / "fixtures"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or REPO_ROOT.parent / "shared" / "data")
CACHE_DIR = default_cache_dir(REPO_ROOT)


def shared_path(*parts: str) -> Path:
    """``SHARED_DATA / parts...`` (whether or not it exists)."""
    return SHARED_DATA.joinpath(*parts)


def has_shared(*parts: str) -> bool:
    """Whether the shared data file or folder ``parts`` is there."""
    return shared_path(*parts).exists()


def require_shared(*parts: str) -> Path:
    """The shared data file or folder ``parts``; skips the calling test when it is missing."""
    path = shared_path(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not found (set ${SHARED_DATA_ENV} to the folder holding it)")
    return path
