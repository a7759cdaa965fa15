"""SIGKILL mid-run: SFT and GRPO resume from their last checkpoint, with no lost or repeated step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.kill_target import STEPS, train


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_sigkill_mid_run_resumes_from_the_last_checkpoint(stage, tiny_base_model, repo_root, tmp_path):
    base = tiny_base_model
    out = tmp_path / stage
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "tests.support.kill_target", stage, str(out), str(base)],
                               cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900
    while not (out / "ready").exists():
        if process.poll() is not None:
            pytest.fail(f"the {stage} run ended before it could be killed:\n{process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the {stage} run wrote no checkpoint in 900 s")
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)  # inside step 2
    assert process.wait() == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1"] and not (out / "adapter").exists()

    (out / "ready").unlink()
    result = train(stage, out, base)
    assert result.resumed_from == "checkpoint-1" and result.global_step == STEPS
    assert [step["step"] for step in result.metrics["steps"]] == list(range(1, STEPS + 1))  # none lost or repeated
    assert result.metrics["steps_this_run"] == STEPS - 1
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
