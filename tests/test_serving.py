"""``mlflow models serve`` on the registered champion: a real HTTP scoring server on loopback.

The registry is a temporary SQLite store holding one promoted version (real artifacts from
``tests/support/registry.py``); the server runs as a subprocess with ``MLFLOW_TRACKING_URI``
set to it, in its own process group (killed at the end): ``tests/support/scoring_server.py``.
"""

from __future__ import annotations

import json

import pytest

from tests.support.registry import serving_world
from tests.support.scoring_server import served_champion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_base_model, tmp_path_factory):
    world = serving_world(tiny_base_model)
    with served_champion(world, tmp_path_factory.mktemp("serving")) as scoring:
        yield world, scoring


def test_the_server_ranks_a_request(server):
    world, scoring = server
    request = world.request(5)
    status, body = scoring.invoke([request])
    assert status == 200, body
    [prediction] = json.loads(body)["predictions"]
    assert sorted(prediction["ranking"]) == sorted(request["candidate_item_ids"])  # a permutation
    assert isinstance(prediction["valid"], bool) and prediction["n_tool_calls"] == 0
    messages = json.loads(prediction["trajectory"])
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"


def test_a_bad_request_is_a_400_that_names_the_problem(server):
    world, scoring = server
    request = world.request(3, user_id="no-such-user")
    status, body = scoring.invoke([request])
    assert status == 400
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert f"unknown user 'no-such-user' in dataset '{world.dataset}'" in error["message"]
