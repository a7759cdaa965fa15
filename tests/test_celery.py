"""Dagster on Celery: a Redis broker (Debian's ``redis-server``) and two ``dagster-celery``
workers on loopback materialize one dataset's ingestion through its tool indexes, with the
project's executor switch (``RECTHINKER_EXECUTOR=celery``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recthinker_dagster.artifacts import INDEX_ASSETS
from tests.support.celery_location import JOB
from tests.support.scoring_server import free_port, wait_until_ready

pytestmark = pytest.mark.slow
# CI sets RECTHINKER_REQUIRE_SERVICES=1: there a missing redis-server fails this test, never skips it
REQUIRED = os.environ.get("RECTHINKER_REQUIRE_SERVICES") == "1"
STARTUP_S = 60


def _stop(process: subprocess.Popen, group: bool = False) -> None:
    """Stop ``process`` (``group``: with everything it started; ``dagster-celery worker start``
    runs the Celery worker and its pool as children that would outlive it)."""
    def send(sig: int) -> None:
        try:
            os.killpg(process.pid, sig) if group else process.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)
    if group:  # the children may outlive the leader by a moment
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        send(signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture()
def broker(tmp_path):
    """A Redis server on a free loopback port (no persistence); its URL."""
    import redis

    server = shutil.which("redis-server")
    if server is None:
        message = "redis-server is missing: scripts/setup.sh installs Debian's redis-server as root"
        pytest.fail(f"{message} (RECTHINKER_REQUIRE_SERVICES=1)") if REQUIRED else pytest.skip(message)
    port = free_port()
    log_path = tmp_path / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                    "no", "--dir", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until_ready(process, answers, log_path, "redis-server", STARTUP_S)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


def test_two_celery_workers_materialize_a_dataset_branch(broker, tmp_path, make_project, repo_root):
    project = make_project(tmp_path / "project")
    home = tmp_path / "dagster_home"  # a persistent instance: the run and the workers share its storage
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    worker_config = tmp_path / "celery.yaml"
    worker_config.write_text(yaml.safe_dump({"execution": {"config": {"broker": broker, "backend": broker}}}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECTHINKER_HOME": str(project.root),
           "RECTHINKER_EXECUTOR": "celery", "RECTHINKER_CELERY_BROKER": broker,
           "MLFLOW_TRACKING_URI": project.tracking_uri, "PYTHONPATH": str(repo_root),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]), "OMP_WAIT_POLICY": "PASSIVE"}
    # the instance's storage exists before the workers start: two processes creating it at once race
    subprocess.run([str(bin_dir / "dagster"), "instance", "info"], env=env, check=True, capture_output=True)
    workers, logs = [], []
    for name in ("worker-a", "worker-b"):
        logs.append(tmp_path / f"{name}.log")
        with open(logs[-1], "wb") as log:
            workers.append(subprocess.Popen(
                [str(bin_dir / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(worker_config),
                 "-n", name, "--", "--concurrency=1"], cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    try:
        run = subprocess.run([str(bin_dir / "dagster"), "job", "execute", "-m", "tests.support.celery_location", "-j", JOB],
                             cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for worker in workers:
            _stop(worker, group=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "RUN_SUCCESS" in output
    for asset in ("interactions", "task_splits", *INDEX_ASSETS.values()):
        assert (project.root / "assets" / asset / "synthetic").is_dir(), asset
    assert (project.root / "assets" / "task_splits" / "synthetic" / "tasks_eval.parquet").exists()
    worked = [log for log in logs if "succeeded in" in log.read_text()]
    assert worked, "no worker ran a step:\n" + "\n".join(log.read_text()[-1500:] for log in logs)
