"""The served agent's request bounds, under concurrent load and against bad requests.

Fast: the bounds and type checks of ``RecThinkerAgent.task_row`` on real tool indexes (no model).
Slow: ``mlflow models serve`` on loopback with the tiny test model (``tests/support/registry.py``),
driven by ``scripts/benchmark_serving.py``'s own functions at a small scale: 8 concurrent
clients, every good request answered; every bad request an HTTP 400 naming its problem; the
server still answering afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import sys
import threading
import time

import pytest

from recthinker_dagster.agent import Generation
from recthinker_dagster.serving.agent import AgentBundle, RecThinkerAgent, ServingConfig
from recthinker_dagster.settings import RegistrySettings, load_profile
from recthinker_dagster.tools import ToolIndexes
from tests.support.paths import REPO_ROOT
from tests.support.registry import SERVING_CONFIG, build_tool_indexes, serving_world
from tests.support.scoring_server import served_champion

CLIENTS = 8
N_REQUESTS = 16
N_CANDIDATES = 5


@functools.cache
def _benchmark():
    """``scripts/benchmark_serving.py`` as a module (registered first: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location("benchmark_serving", REPO_ROOT / "scripts" / "benchmark_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def index_folders(tmp_path_factory):
    """Real tool index folders and tasks (synthetic, and ML-1M users 1-150 when the shared data is there)."""
    return build_tool_indexes(tmp_path_factory.mktemp("indexes"))


@pytest.fixture(scope="module")
def indexed(index_folders):
    """The loaded indexes, one task row and its dataset."""
    folders, tasks = index_folders
    dataset = "ml-1m" if "ml-1m" in folders else "synthetic"
    indexes = {name: ToolIndexes.load(folder) for name, folder in folders.items()}
    return indexes, tasks[dataset].row(0, named=True), dataset


def _agent(indexed, **config) -> RecThinkerAgent:
    return RecThinkerAgent(None, indexed[0], ServingConfig(**config))  # validation only: no backend needed


def _request(indexed, **overrides) -> dict:
    _, task, dataset = indexed
    return {"dataset": dataset, "user_id": task["user_id"], "candidate_item_ids": task["candidate_item_ids"][:5],
            **overrides}


def test_the_bounds_default_to_the_registry_settings_in_every_profile():
    assert (ServingConfig().max_candidates, ServingConfig().max_history_len) == (100, 2000)
    assert (RegistrySettings().max_candidates, RegistrySettings().max_history_len) == (100, 2000)
    for name in ("smoke", "demo", "full"):
        registry = load_profile(name).registry
        assert (registry.max_candidates, registry.max_history_len) == (100, 2000)
    with pytest.raises(ValueError, match="max_candidates must be >= 2"):
        ServingConfig(max_candidates=1)


def test_up_to_the_bounds_is_a_request_one_more_is_a_clear_error(indexed):
    _, task, _ = indexed
    candidates, history = task["candidate_item_ids"], task["history_item_ids"]
    agent = _agent(indexed, max_candidates=6, max_history_len=3)
    row = agent.task_row(_request(indexed, candidate_item_ids=candidates[:6], history_item_ids=history[:3]))
    assert len(row["candidate_item_ids"]) == 6 and len(row["history_item_ids"]) == 3
    with pytest.raises(ValueError, match=r"request 0: 7 candidates given; this model ranks at most 6 per request "
                                         r"\(serving config max_candidates\)"):
        agent.task_row(_request(indexed, candidate_item_ids=candidates[:7]))
    with pytest.raises(ValueError, match=r"request 0: 4 history items given; at most 3 \(serving config max_history_len\)"):
        agent.task_row(_request(indexed, history_item_ids=history[:4]))
    # the stored history (from the user-profile index) is the model's own data: never bounded
    assert len(agent.task_row(_request(indexed))["history_item_ids"]) == len(history) > 3


def test_ten_thousand_candidates_fail_on_the_bound_before_any_lookup(indexed):
    huge = [f"item-{k}" for k in range(10_000)]  # unknown ids too: the bound is named first
    with pytest.raises(ValueError, match="10000 candidates given; this model ranks at most 100"):
        _agent(indexed).task_row(_request(indexed, candidate_item_ids=huge))


@pytest.mark.parametrize("overrides, message", [
    ({"user_id": ["1"]}, r"request 0: user_id must be a string \(or integer\) id, got list"),
    ({"user_id": 1.5}, r"user_id must be a string \(or integer\) id, got float '1.5'"),
    ({"dataset": {"name": "ml-1m"}}, r"dataset must be a string \(or integer\) id, got dict"),
    ({"candidate_item_ids": 42}, "candidate_item_ids must be a list of item ids, got int '42'"),
    ({"candidate_item_ids": [1.5, 2.5]}, r"must hold string \(or integer\) item ids, got \[1.5, 2.5\]"),
    ({"history_item_ids": {"a": 1}}, "history_item_ids must be a list of item ids, got dict"),
])
def test_wrong_types_are_clear_errors(indexed, overrides, message):
    with pytest.raises(ValueError, match=message):
        _agent(indexed).task_row(_request(indexed, **overrides))


def test_integer_ids_are_read_as_strings(indexed):
    _, task, dataset = indexed
    if dataset != "ml-1m":
        pytest.skip("ML-1M's ids are integers; the synthetic ones are not")
    candidates = [int(i) for i in task["candidate_item_ids"][:3]]
    row = _agent(indexed).task_row(_request(indexed, user_id=int(task["user_id"]), candidate_item_ids=candidates))
    assert row["user_id"] == task["user_id"] and row["candidate_item_ids"] == task["candidate_item_ids"][:3]
    assert _agent(indexed).task_row(_request(indexed, user_id=float(task["user_id"])))["user_id"] == task["user_id"]


class GatedBackend:
    """Answers "B, A" (completed in candidate order); the first batch waits for ``gate``."""

    name = "gated"

    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.fail = fail

    def generate(self, conversations, tools, params):
        self.entered.set()
        assert self.gate.wait(60)
        self.batches.append(len(conversations))
        if self.fail:
            raise RuntimeError("the model broke")
        return [Generation("<answer>B, A</answer>", 100, 5) for _ in conversations]


def _concurrent_calls(indexed, backend, n_calls: int, **config):
    """``n_calls`` one-request ``rank`` calls, for different users: the first one holds the model
    (its batch waits for the gate) until the others are waiting, then all run."""
    indexes, _, dataset = indexed
    agent = RecThinkerAgent(backend, indexes, ServingConfig(batch_size=8, max_turns=1, **config))
    users = indexes[dataset].profiles.users()[:n_calls]
    requests = []
    for user in users:
        history = indexes[dataset].profiles.history(user)[0]
        candidates = [i for i in indexes[dataset].catalog.item_ids if i not in set(history)][:4]
        requests.append({"dataset": dataset, "user_id": user, "candidate_item_ids": candidates})
    results: dict[int, object] = {}

    def call(k):
        try:
            results[k] = agent.rank([requests[k]])[0]
        except Exception as error:  # noqa: BLE001 - compared below
            results[k] = error

    threads = [threading.Thread(target=call, args=(k,)) for k in range(n_calls)]
    threads[0].start()
    assert backend.entered.wait(60)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 60
    while config.get("coalesce_requests", True) and agent.waiting < n_calls - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # without coalescing: let the others reach the model lock
    backend.gate.set()
    for thread in threads:
        thread.join(60)
    return requests, [results[k] for k in range(n_calls)]


def test_calls_waiting_for_the_model_share_one_batch_and_each_gets_its_own_ranking(indexed):
    backend = GatedBackend()
    requests, results = _concurrent_calls(indexed, backend, 5)
    # the first call alone, then the four that waited for it together (each run may take several turns)
    assert backend.batches[0] == 1 and max(backend.batches) == 4, backend.batches
    for request, result in zip(requests, results, strict=True):
        candidates = request["candidate_item_ids"]
        assert result["ranking"] == [candidates[1], candidates[0], *candidates[2:]]
        assert json.loads(result["trajectory"])[1]["content"].count(f"User {request['user_id']}'s") == 1


def test_without_coalescing_calls_run_one_by_one(indexed):
    backend = GatedBackend()
    _, results = _concurrent_calls(indexed, backend, 4, coalesce_requests=False)
    assert max(backend.batches) == 1 and all(isinstance(r, dict) for r in results)


def test_a_failing_model_run_fails_every_call_in_it_and_only_those(indexed):
    backend = GatedBackend(fail=True)
    _, results = _concurrent_calls(indexed, backend, 3)
    assert backend.batches == [1, 2]  # each run fails at its first turn
    assert all(isinstance(r, RuntimeError) and str(r) == "the model broke" for r in results)


# -- the real server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_base_model, tmp_path_factory):
    world = serving_world(tiny_base_model)
    with served_champion(world, tmp_path_factory.mktemp("serving-load"), config=SERVING_CONFIG,
                         request_timeout_s=600) as server:
        yield world, server


@pytest.mark.slow
def test_eight_concurrent_clients_get_every_ranking(served):
    world, server = served
    bench = _benchmark()
    requests = bench.load_requests(world, N_REQUESTS, N_CANDIDATES)
    assert len({r["user_id"] for r in requests}) > 1
    load = bench.run_load(server, requests, CLIENTS, timeout=600)
    assert load.errors == [] and len(load.latencies_s) == N_REQUESTS
    summary = load.summary()
    assert 0 < summary["p50_s"] <= summary["p99_s"] <= summary["max_s"]


@pytest.mark.slow
def test_bad_requests_are_400s_naming_the_problem_and_the_server_keeps_serving(served):
    world, server = served
    bench = _benchmark()
    config = ServingConfig.from_dict(SERVING_CONFIG)
    cases = bench.bad_requests(world, config.max_candidates, config.max_history_len)
    assert len(cases) >= 10
    outcomes = bench.send_bad_requests(server, cases)
    unclear = [dataclasses.asdict(o) for o in outcomes if not o.clear]
    assert not unclear, json.dumps(unclear, indent=1)[:3000]
    request = world.request(N_CANDIDATES, k=1)
    latency, error = bench.rank_once(server, request, timeout=600)
    assert error is None and server.ping()


def test_the_served_agent_generates_on_the_server_without_loading_weights(openai_server, index_folders, indexed,
                                                                          monkeypatch, tmp_path):
    folders, _ = index_folders
    _, row, dataset = indexed
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{openai_server.server_address[1]}/v1")
    monkeypatch.setenv("RECTHINKER_SERVED_MODEL", "sloppy")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    agent = AgentBundle(empty, (), {dataset: folders[dataset]}, {"max_turns": 2}).load()
    (result,) = agent.rank([{"dataset": dataset, "user_id": row["user_id"],
                             "candidate_item_ids": row["candidate_item_ids"]}])
    assert sorted(result["ranking"]) == sorted(row["candidate_item_ids"])  # repaired into a permutation
    # the stub's labels are not the task's: nothing valid, so the agent asks again, then repairs
    assert not result["valid"] and openai_server.counts["sloppy"] >= 1
