"""``mlflow models serve`` on the registered champion: a real HTTP scoring server on loopback.

The registry is a temporary SQLite store holding one promoted version (real artifacts from
``tests/_registry.py``); the server runs as a subprocess with ``MLFLOW_TRACKING_URI`` set to
it, in its own process group (killed at the end).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from recthinker_dagster.serving.promotion import decide_promotion
from recthinker_dagster.serving.registry import apply_promotion
from tests.support.registry import log_version, new_registry, serving_world

NAME = "recthinker-agent"
STARTUP_S = 120
pytestmark = pytest.mark.slow
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, payload: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _mlflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="module")
def server(prepared_base_model, tmp_path_factory):
    world = serving_world(prepared_base_model[0])
    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("serving")
    uri = new_registry(root)
    try:
        version = str(log_version(world).version)
        decision = decide_promotion({"ndcg@10": 0.3}, None, {"ndcg@10": 0.2})
        apply_promotion(mlflow.MlflowClient(uri), NAME, version, decision, {"ndcg@10": 0.3})
    finally:
        mlflow.set_tracking_uri(previous)

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        # --env-manager local runs `uvicorn` from PATH: this interpreter's environment
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [*_mlflow_command(), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _request(f"{base_url}/ping", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer within {STARTUP_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield world, base_url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_the_server_ranks_a_request(server):
    world, base_url = server
    request = world.request(5)
    status, body = _request(f"{base_url}/invocations", {"dataframe_records": [request]})
    assert status == 200, body
    [prediction] = json.loads(body)["predictions"]
    assert sorted(prediction["ranking"]) == sorted(request["candidate_item_ids"])  # a permutation
    assert isinstance(prediction["valid"], bool) and prediction["n_tool_calls"] == 0
    messages = json.loads(prediction["trajectory"])
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"


def test_a_bad_request_is_a_400_that_names_the_problem(server):
    world, base_url = server
    request = world.request(3, user_id="no-such-user")
    status, body = _request(f"{base_url}/invocations", {"dataframe_records": [request]})
    assert status == 400
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert f"unknown user 'no-such-user' in dataset '{world.dataset}'" in error["message"]
