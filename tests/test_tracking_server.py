"""A shared MLflow: a stage's run, the registry and the artifacts on a real ``mlflow server`` on
loopback (the tracking URI is the one switch), and the registered agent served from it."""

from __future__ import annotations

import json

import mlflow
import pytest

from recthinker_dagster.defs.resources import MLflowTracking
from tests.support.registry import serving_world
from tests.support.scoring_server import CHAMPION_URI, register_champion, scoring_server, tracking_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("tracking")) as running:
        yield running


def test_a_stage_logs_its_run_and_artifacts_to_the_tracking_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("RECTHINKER_MLFLOW_ARTIFACT_ROOT", raising=False)
    tracking = MLflowTracking()  # from the environment, as the pipeline builds it
    assert (tracking.tracking_uri, tracking.artifact_root) == (server.uri, "")
    folder = tmp_path / "evaluation"
    folder.mkdir()
    (folder / "results.md").write_text("| system | NDCG@10 |\n|---|---|\n| sft | 0.5 |\n")
    attempt = tracking.open_attempt("evaluation", {"asset": "evaluation"})
    run_id = tracking.log_run("evaluation", run_id=attempt, metrics={"ndcg@10": 0.5}, artifacts={"evaluation": folder})

    run = mlflow.MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["ndcg_at_10"] == 0.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the server stores them
    stored = list(server.artifacts.rglob("results.md"))
    assert len(stored) == 1 and stored[0].read_text() == (folder / "results.md").read_text()


def test_the_registered_agent_is_served_from_the_tracking_server(server, tiny_base_model, tmp_path):
    world = serving_world(tiny_base_model)
    uri = register_champion(world, tmp_path, tracking_uri=server.uri)
    assert uri == server.uri
    version = mlflow.MlflowClient(server.uri).get_model_version_by_alias("recthinker-agent", "champion")
    assert version.source.startswith(("models:/", "mlflow-artifacts:"))
    with scoring_server(CHAMPION_URI, server.uri, tmp_path / "serve") as scoring:
        status, body = scoring.invoke([world.request(5)])
    assert status == 200, body
    ranking = json.loads(body)["predictions"][0]["ranking"]
    assert sorted(ranking) == sorted(world.request(5)["candidate_item_ids"])
