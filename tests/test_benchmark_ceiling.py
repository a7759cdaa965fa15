"""scripts/benchmark_ceiling.py: the ceiling formula, and a run on the tiny model that writes every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_ceiling import ceiling  # noqa: E402


def test_the_ceiling_adds_each_generated_token_s_prefill_and_decoding_time():
    # 3 prefill tokens at 600/s (5 ms) plus one decoding row-step at 200/s (5 ms): 100 tokens/s
    assert ceiling(600.0, 200.0, 3.0) == pytest.approx(100.0)
    assert ceiling(600.0, 200.0, 0.0) == pytest.approx(200.0)  # nothing to prefill: the decoding rate


def test_a_run_on_the_tiny_model_writes_rates_and_ceilings(tiny_base_model, tmp_path):
    out = tmp_path / "ceiling.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_ceiling.py"), "--model", str(tiny_base_model),
                    "--rows", "2", "--prefill-tokens", "16", "--contexts", "24", "--steps", "2", "--threads", "1",
                    "--prefilled-per-generated", "3", "--json-out", str(out)], check=True, cwd=REPO,
                   capture_output=True, timeout=300)
    figures = json.loads(out.read_text())
    assert [p["rows"] for p in figures["prefill"]] == [2] and figures["prefill"][0]["tokens_per_s"] > 0
    assert [(d["rows"], d["context"]) for d in figures["decoding"]] == [(2, 24)]
    (only,) = figures["ceilings"]
    expected = ceiling(figures["prefill"][0]["tokens_per_s"], figures["decoding"][0]["tokens_per_s"], 3)
    assert only["prefilled_per_generated"] == 3 and only["tokens_per_s"] == pytest.approx(expected, abs=0.1)
