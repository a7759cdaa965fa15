"""``mlflow models serve`` on loopback: start it, talk to it, stop it.

Used by the serving tests and ``scripts/benchmark_serving.py``:

    with served_champion(world, root, config=SERVING_CONFIG) as server:   # log, promote, serve
        status, body = server.invoke([world.request(5)])                  # POST /invocations

``tracking_server(root)`` runs a shared ``mlflow server`` (tracking, registry, artifacts) the
same way.

The server runs ``--env-manager local`` (this interpreter's environment) in its own process
group, with its output in ``<root>/serve.log``; the whole group is killed on exit. Requests
never go through a proxy.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "recthinker-agent"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
STARTUP_S = 180
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


class ServerStartError(RuntimeError):
    """The server exited or did not answer ``/ping`` in time (the message ends with its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: bytes | None = None, timeout: float = 300) -> tuple[int, str]:
    """GET ``url`` (no body) or POST a JSON ``body``; the status and the response text."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@dataclass(frozen=True)
class ScoringServer:
    base_url: str
    log_path: Path

    def invoke(self, records: Sequence[Mapping] | None = None, *, body: bytes | None = None,
               timeout: float = 300) -> tuple[int, str]:
        """POST ``{"dataframe_records": records}`` (or a raw ``body``) to ``/invocations``."""
        if body is None:
            body = json.dumps({"dataframe_records": list(records or [])}).encode()
        return http(f"{self.base_url}/invocations", body, timeout)

    def ping(self, timeout: float = 5) -> bool:
        try:
            return http(f"{self.base_url}/ping", timeout=timeout)[0] == 200
        except OSError:
            return False


def _mlflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"]


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until_ready(process: subprocess.Popen, ready: Callable[[], bool], log_path: Path, what: str,
                      startup_s: float) -> None:
    """Poll ``ready`` every second until it holds; a ``ServerStartError`` with the log's end when
    ``process`` exits first or ``startup_s`` passes."""
    deadline = time.monotonic() + startup_s
    while not ready():
        if process.poll() is not None:
            raise ServerStartError(f"{what} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what}: not ready within {startup_s:.0f}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


@contextmanager
def scoring_server(model_uri: str, tracking_uri: str, root: Path, *, request_timeout_s: int = 60,
                   startup_s: float = STARTUP_S) -> Iterator[ScoringServer]:
    """``mlflow models serve -m model_uri`` on a free loopback port until the block ends.

    ``request_timeout_s`` is the server's ``--timeout``: a request still running then gets a
    504, so under load it must cover the queue in front of a request, not just its own work."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        # --env-manager local runs `uvicorn` from PATH: this interpreter's environment
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [*_mlflow_command(), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-t", str(request_timeout_s)]
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = ScoringServer(f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_ready(process, server.ping, log_path, "mlflow models serve (/ping)", startup_s)
        yield server
    finally:
        _stop(process)


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    artifacts: Path  # the server's artifact store (--artifacts-destination)
    log_path: Path


@contextmanager
def tracking_server(root: Path, *, startup_s: float = STARTUP_S) -> Iterator[TrackingServer]:
    """``mlflow server`` on a free loopback port until the block ends: a SQLite store and a
    proxied artifact store under ``root`` (clients reach both over HTTP only)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [*_mlflow_command(), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", str(root / "server-artifacts"), "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_path = root / "tracking-server.log"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = TrackingServer(f"http://127.0.0.1:{port}", root / "server-artifacts", log_path)

    def healthy() -> bool:
        try:
            return http(f"{server.uri}/health", timeout=5)[0] == 200
        except OSError:
            return False

    try:
        wait_until_ready(process, healthy, log_path, "mlflow server (/health)", startup_s)
        yield server
    finally:
        _stop(process)


def register_champion(world, root: Path, config: Mapping | None = None, *, tracking_uri: str | None = None) -> str:
    """Log ``world``'s agent (SFT adapter) in a registry and promote it to champion; the
    registry's tracking URI: ``tracking_uri`` (a tracking server), else a fresh SQLite store
    under ``root``. The model holds a copy of the code as it is now."""
    import mlflow

    from recthinker_dagster.serving.promotion import decide_promotion
    from recthinker_dagster.serving.registry import apply_promotion
    from tests.support.registry import log_version, new_registry

    previous = mlflow.get_tracking_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    uri = tracking_uri or new_registry(root)
    try:
        version = str(log_version(world, **({"config": config} if config is not None else {})).version)
        decision = decide_promotion({"ndcg@10": 0.3}, None, {"ndcg@10": 0.2})
        apply_promotion(mlflow.MlflowClient(uri), MODEL_NAME, version, decision, {"ndcg@10": 0.3})
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


@contextmanager
def served_champion(world, root: Path, *, config: Mapping | None = None,
                    request_timeout_s: int = 60) -> Iterator[ScoringServer]:
    """:func:`register_champion` under ``root``, then serve ``models:/recthinker-agent@champion``."""
    uri = register_champion(world, root, config)
    with scoring_server(CHAMPION_URI, uri, root, request_timeout_s=request_timeout_s) as server:
        yield server
