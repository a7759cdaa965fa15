"""MLflow attempts of long stages: RUNNING while they work, FINISHED when published, FAILED when
they raise, and FAILED on the next attempt when their process was killed (a real SQLite store)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import mlflow
import pytest

from recthinker_dagster.defs.resources import ATTEMPT_FAILURE, MLflowTracking

ATTEMPT = """
import sys, time
from recthinker_dagster.defs.resources import MLflowTracking
tracking = MLflowTracking(tracking_uri=sys.argv[1], artifact_root=sys.argv[2])
print(tracking.open_attempt("sft_model", {"asset": "sft_model"}), flush=True)
time.sleep(600)
"""


@pytest.fixture()
def tracking(tmp_path):
    return MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "artifacts"))


def _run(tracking, run_id):
    return mlflow.MlflowClient(tracking.tracking_uri).get_run(run_id)


def test_a_killed_attempt_is_marked_failed_by_the_next_one(tracking, repo_root):
    process = subprocess.Popen([sys.executable, "-c", ATTEMPT, tracking.tracking_uri, tracking.artifact_root],
                               cwd=repo_root, stdout=subprocess.PIPE, text=True)
    killed = process.stdout.readline().strip()
    assert _run(tracking, killed).info.status == "RUNNING"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _run(tracking, killed).info.status == "RUNNING"  # nobody closed it

    attempt = tracking.open_attempt("sft_model", {"asset": "sft_model"})
    stale = _run(tracking, killed)
    assert stale.info.status == "FAILED" and stale.data.tags[ATTEMPT_FAILURE].startswith("killed: process")
    assert _run(tracking, attempt).info.status == "RUNNING"  # this process is alive: left alone
    assert tracking.fail_abandoned("sft_model") == []

    assert tracking.log_run("sft_model", run_id=attempt, metrics={"loss": 0.5}, tags={"dvc_md5": "abc"}) == attempt
    done = _run(tracking, attempt)
    assert done.info.status == "FINISHED" and done.data.metrics["loss"] == 0.5 and done.data.tags["dvc_md5"] == "abc"


def test_an_attempt_that_raises_is_marked_failed_with_the_error(tracking):
    attempt = tracking.open_attempt("rl_model")
    tracking.close_attempt(attempt, RuntimeError("GRPO had no learning signal"))
    run = _run(tracking, attempt)
    assert run.info.status == "FAILED" and run.data.tags[ATTEMPT_FAILURE] == "RuntimeError: GRPO had no learning signal"


def test_disabled_tracking_opens_nothing(tmp_path):
    off = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", artifact_root=str(tmp_path), enabled=False)
    assert off.open_attempt("sft_model") == ""
    off.close_attempt("", RuntimeError("x"))
    assert not (tmp_path / "m.db").exists()
