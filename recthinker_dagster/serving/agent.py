"""The agent as a service: load the model and the tool indexes once, rank candidates per request.

    from recthinker_dagster.serving.agent import AgentBundle, ServingConfig

    agent = AgentBundle(
        base_model_dir="assets/base_model",
        adapter_dirs=["runs/sft/adapter"],                      # SFT first, then e.g. an RL adapter
        tool_indexes={"ml-1m": {"catalog": "assets/item_catalog/ml-1m", ...}},  # every INDEX_NAMES
        config=ServingConfig(max_turns=4, max_new_tokens=256),
    ).load()
    [result] = agent.rank([{"dataset": "ml-1m", "user_id": "10", "candidate_item_ids": ["1193", "661", "914"]}])
    result["ranking"]        # ["661", "1193", "914"]: item ids, best first (always a permutation)
    result["valid"]          # the model answered with every candidate exactly once
    result["n_tool_calls"]   # tool calls the agent made (invalid ones included)
    result["trajectory"]     # the conversation (OpenAI-style messages) as a JSON string

Model: the base model with each LoRA adapter merged in order (:func:`load_merged_model`): the
SFT adapter, then optionally an RL adapter that was trained on top of the SFT-merged model.
The tokenizer (and its chat template) comes from the last adapter folder that holds one,
else from the base model.

Requests: ``{"dataset", "user_id", "candidate_item_ids", "history_item_ids" (optional)}``.
Ids are strings (integers are accepted and read as strings); item id lists may also be JSON
strings (``'["1193", "661"]'``). Without a history, the user's history is the one the tools
see: the user's interactions in the user-profile index (the training-visible interactions,
oldest first; for users of the training tasks this leaves out their training target, exactly
as during training). Requests are bounded: 2 to ``ServingConfig.max_candidates`` candidates
and at most ``max_history_len`` history items given in the request. A request for an unknown
dataset or user, with an id of the wrong type, unknown item ids, duplicate candidates, too few
or too many candidates or too long a history raises ``ValueError`` naming the bad value and
the bound, before anything runs. The tasks have no target (``target_item_id`` is ``""``), so
the trajectories' metrics are meaningless and are not returned.

Each ``rank`` call runs the real agent loop (:func:`~recthinker_dagster.agent.run_agent`)
over all its requests as one batch. One model run at a time (one model, one cache): calls
that arrive while the model is busy wait, and the next run takes all of them together (up to
``batch_size`` rows; ``coalesce_requests=False`` runs them one call at a time). Decoding is
greedy either way; only float rounding in padded batches can (rarely) make a request's output
depend on the requests it shares a batch with.

``served_model`` (or ``$RECTHINKER_SERVED_MODEL``) moves generation to the OpenAI-compatible
server at ``$OPENAI_BASE_URL`` (``vllm serve`` with the adapters as LoRA modules; docs/deploy.md):
no weights are loaded here, the tools still run here, and answers take the HTTP backends'
documented repair (``valid`` is then false for a repaired answer).
No Dagster, MLflow or DVC here.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from recthinker_dagster.agent import AgentConfig, AgentTask, SamplingParams, run_agent
from recthinker_dagster.agent.history import history_lines
from recthinker_dagster.models.loading import load_agent_model as load_merged_model
from recthinker_dagster.settings import RegistrySettings
from recthinker_dagster.tools import INDEX_NAMES, Toolbox, ToolIndexes
from recthinker_dagster.tools.toolbox import DEFAULT_OUTPUT_BUDGET

MIN_CANDIDATES = 2
# the request bounds' defaults are the registry settings' (documented there and in docs/serving.md)
DEFAULT_MAX_CANDIDATES = RegistrySettings.max_candidates
DEFAULT_MAX_HISTORY_LEN = RegistrySettings.max_history_len
REQUEST_KEYS = ("dataset", "user_id", "candidate_item_ids", "history_item_ids")
RESULT_KEYS = ("ranking", "valid", "n_tool_calls", "trajectory")
NO_TARGET = ""  # serving tasks have no held-out target
SERVING_SPLIT = "serving"
ENV_SERVED_MODEL = "RECTHINKER_SERVED_MODEL"


@dataclass(frozen=True)
class ServingConfig:
    """How the served agent runs: budgets, decoding, batching and where the model runs."""

    max_turns: int = 6  # assistant turns before the final answer is demanded
    max_tool_calls: int = 8  # tool calls per request, invalid ones included
    max_new_tokens: int = 384  # per assistant turn
    prompt_history_len: int = 10  # most recent history items shown in the first user message
    batch_size: int = 8  # conversations per model.generate call
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = 0
    max_observation_chars: int = 2000  # longer tool outputs are cut
    output_budget_chars: int = DEFAULT_OUTPUT_BUDGET  # the tools' own output budget
    dtype: str = "auto"  # auto, bfloat16, float16 or float32
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    chat_template: str = "auto"  # auto, qwen2_5 or keep (see agent/backends/chat_template.py)
    max_candidates: int = DEFAULT_MAX_CANDIDATES  # per request: more is a bad request
    max_history_len: int = DEFAULT_MAX_HISTORY_LEN  # history items given in a request: more is a bad request
    coalesce_requests: bool = True  # concurrent calls share one batched model run (see RecThinkerAgent.run)
    # generate on the OpenAI-compatible server at $OPENAI_BASE_URL (vLLM) under this model name instead
    # of loading the weights in-process; $RECTHINKER_SERVED_MODEL sets it at serve time
    served_model: str | None = None

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tool_calls < 0 or self.max_new_tokens < 1:
            raise ValueError("max_turns and max_new_tokens must be >= 1 and max_tool_calls >= 0")
        if self.prompt_history_len < 0 or self.batch_size < 1:
            raise ValueError("prompt_history_len must be >= 0 and batch_size >= 1")
        if self.max_candidates < MIN_CANDIDATES or self.max_history_len < 0:
            raise ValueError(f"max_candidates must be >= {MIN_CANDIDATES} and max_history_len >= 0, "
                             f"got {self.max_candidates} and {self.max_history_len}")

    @classmethod
    def from_dict(cls, values: Mapping | ServingConfig | None) -> ServingConfig:
        """From plain values (unknown keys raise ``ValueError``)."""
        if isinstance(values, ServingConfig):
            return values
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serving config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def agent_config(self, producer: str | None = None) -> AgentConfig:
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, seed=self.seed)
        return AgentConfig(max_turns=self.max_turns, max_tool_calls=self.max_tool_calls,
                           max_observation_chars=self.max_observation_chars, sampling=sampling, producer=producer)


# -- the model ---------------------------------------------------------------------------------


# -- requests ----------------------------------------------------------------------------------


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _shown(value) -> str:
    return f"{type(value).__name__} {str(value)[:80]!r}"


def scalar_id(value, what: str) -> str:
    """A dataset or user id as a string: a string or an integer, nothing else."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():  # pandas makes ints floats next to a missing value
        return str(int(value))
    raise ValueError(f"{what} must be a string (or integer) id, got {_shown(value)}")


def id_list(value, what: str) -> list[str] | None:
    """A list of ids from a list/tuple/array or a JSON list string; None when absent."""
    if _missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{what} must be a list of item ids or a JSON list string, got {value[:80]!r}") from None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy arrays, pandas series
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of item ids, got {_shown(value)}")  # noqa: TRY004 - a bad request
    bad = [v for v in value if not isinstance(v, (str, numbers.Integral)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{what} must hold string (or integer) item ids, got {bad[:3]!r}")
    return [v if isinstance(v, str) else str(int(v)) for v in value]


def _preview(values: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


@dataclass
class _PendingCall:
    """A validated call waiting for the model: its rows, then its trajectories or its error."""

    rows: list[dict]
    trajectories: list = field(default_factory=list)
    error: BaseException | None = None
    finished: bool = False


@dataclass
class AgentBundle:
    """What a served agent is made of: folders and the serving config (``load()`` builds it)."""

    base_model_dir: str | os.PathLike
    adapter_dirs: Sequence[str | os.PathLike] = ()
    tool_indexes: Mapping[str, Mapping[str, str | os.PathLike]] = field(default_factory=dict)
    config: ServingConfig | Mapping | None = None

    def check(self) -> None:
        """Raise ``FileNotFoundError``/``ValueError`` for a missing folder or index."""
        if not self.tool_indexes:
            raise ValueError("no tool indexes given: need {dataset: {index_name: folder}}")
        for dataset, folders in self.tool_indexes.items():
            missing = [name for name in INDEX_NAMES if name not in folders]
            if missing:
                raise ValueError(f"dataset {dataset!r}: no folder for indexes {missing}; need {list(INDEX_NAMES)}")
            for name, folder in folders.items():
                if not Path(folder).is_dir():
                    raise FileNotFoundError(f"tool index {name} of dataset {dataset!r}: folder {folder} does not exist")
        for k, folder in enumerate([self.base_model_dir, *self.adapter_dirs]):
            if not Path(folder).is_dir():
                what = "base model" if k == 0 else f"adapter {k - 1}"
                raise FileNotFoundError(f"{what} folder {folder} does not exist")

    def load(self) -> RecThinkerAgent:
        self.check()
        config = ServingConfig.from_dict(self.config)
        indexes = {dataset: ToolIndexes.load({n: Path(f) for n, f in folders.items()})
                   for dataset, folders in self.tool_indexes.items()}
        name = "recthinker:" + "+".join([Path(self.base_model_dir).name, *(Path(a).name for a in self.adapter_dirs)])
        served = config.served_model or os.environ.get(ENV_SERVED_MODEL)
        if served:  # the server holds the weights (docs/deploy.md, vLLM)
            from recthinker_dagster.agent.backends.openai_backend import (
                OpenAICompatibleBackend,
            )

            server = OpenAICompatibleBackend(model=served, name=f"{name}@{served}", concurrency=config.batch_size)
            return RecThinkerAgent(server, indexes, config)
        model, tokenizer = load_merged_model(self.base_model_dir, self.adapter_dirs,
                                             dtype=config.dtype, device=config.device)
        from recthinker_dagster.agent.backends.transformers_backend import (
            TransformersBackend,
        )

        backend = TransformersBackend(model, tokenizer, name=name, batch_size=config.batch_size,
                                      chat_template=config.chat_template)
        return RecThinkerAgent(backend, indexes, config)


class RecThinkerAgent:
    """Ranks candidate items for users of the datasets whose tool indexes it holds.

    ``backend`` is any agent backend (``TransformersBackend`` when built by
    :meth:`AgentBundle.load`); ``indexes`` maps dataset name -> :class:`ToolIndexes`."""

    def __init__(self, backend, indexes: Mapping[str, ToolIndexes], config: ServingConfig | Mapping | None = None):
        if not indexes:
            raise ValueError("a RecThinkerAgent needs the tool indexes of at least one dataset")
        self.backend = backend
        self.indexes = dict(indexes)
        self.config = ServingConfig.from_dict(config)
        self._lock = threading.Lock()  # one model run at a time
        self._pending_lock = threading.Lock()
        self._pending: deque[_PendingCall] = deque()

    @classmethod
    def load(cls, base_model_dir, adapter_dirs=(), tool_indexes=None, config=None) -> RecThinkerAgent:
        """Shorthand for ``AgentBundle(...).load()``."""
        return AgentBundle(base_model_dir, adapter_dirs, tool_indexes or {}, config).load()

    @property
    def datasets(self) -> list[str]:
        return sorted(self.indexes)

    @property
    def waiting(self) -> int:
        """Calls validated and waiting for the model (coalesced ones only)."""
        with self._pending_lock:
            return len(self._pending)

    # -- requests -> task rows ---------------------------------------------------------------

    def task_row(self, request: Mapping, k: int = 0) -> dict:
        """The task-table row of request number ``k`` (validated; raises ``ValueError``)."""
        where = f"request {k}"
        if not isinstance(request, Mapping):
            raise ValueError(f"{where}: a request must be a mapping with keys {list(REQUEST_KEYS)}, "  # noqa: TRY004 - a bad request
                             f"got {type(request).__name__}")
        unknown_keys = sorted(set(request) - set(REQUEST_KEYS))
        if unknown_keys:
            raise ValueError(f"{where}: unknown keys {unknown_keys}; a request has {list(REQUEST_KEYS)}")
        for key in ("dataset", "user_id", "candidate_item_ids"):
            if _missing(request.get(key)):
                raise ValueError(f"{where}: {key} is missing")
        dataset = scalar_id(request["dataset"], f"{where}: dataset")
        indexes = self.indexes.get(dataset)
        if indexes is None:
            raise ValueError(f"{where}: unknown dataset {dataset!r}; this agent serves {self.datasets}")
        user = scalar_id(request["user_id"], f"{where}: user_id")
        profiles = indexes.profiles
        stored = profiles.history(user)
        if stored is None and user not in profiles.meta.get("demographics", {}):
            raise ValueError(f"{where}: unknown user {user!r} in dataset {dataset!r} (not in its user-profile index)")
        candidates = id_list(request["candidate_item_ids"], f"{where}: candidate_item_ids") or []
        if len(candidates) < MIN_CANDIDATES:
            raise ValueError(f"{where}: {len(candidates)} candidate(s) given ({_preview(candidates)}); "
                             f"rank at least {MIN_CANDIDATES}")
        if len(candidates) > self.config.max_candidates:
            raise ValueError(f"{where}: {len(candidates)} candidates given; this model ranks at most "
                             f"{self.config.max_candidates} per request (serving config max_candidates)")
        duplicates = sorted(item for item, n in Counter(candidates).items() if n > 1)
        if duplicates:
            raise ValueError(f"{where}: duplicate candidate item ids {_preview(duplicates)}")
        history = id_list(request.get("history_item_ids"), f"{where}: history_item_ids")
        if history is not None and len(history) > self.config.max_history_len:
            raise ValueError(f"{where}: {len(history)} history items given; at most {self.config.max_history_len} "
                             f"(serving config max_history_len): send the most recent ones")
        if history is None:
            history = stored[0] if stored is not None else []
        catalog = indexes.catalog.index
        for what, ids in (("candidate", candidates), ("history", history)):
            unknown = [i for i in ids if i not in catalog]
            if unknown:
                raise ValueError(f"{where}: unknown {what} item ids {_preview(unknown)} in dataset {dataset!r}")
        return {
            "task_id": f"{SERVING_SPLIT}/{dataset}/{user}/{k}",
            "dataset": dataset,
            "split": SERVING_SPLIT,
            "group": "",
            "user_id": user,
            "target_item_id": NO_TARGET,
            "history_item_ids": history,
            "candidate_item_ids": candidates,
        }

    def task_rows(self, requests: Sequence[Mapping]) -> list[dict]:
        return [self.task_row(request, k) for k, request in enumerate(requests)]

    # -- ranking -------------------------------------------------------------------------------

    def run(self, requests: Sequence[Mapping]):
        """The agent's :class:`~recthinker_dagster.agent.Trajectory` per request, in order.

        Requests are validated first, in the caller's thread (a bad request fails only its own
        call). One model run at a time; with ``coalesce_requests`` the thread that gets the model
        runs every call waiting for it (in arrival order, up to ``batch_size`` rows, at least
        one call) as one batch, so concurrent single-request calls share ``generate`` batches
        instead of queueing one by one."""
        rows = self.task_rows(list(requests))
        if not rows:
            return []
        if not self.config.coalesce_requests:
            with self._lock:
                return self._run_rows(rows)
        call = _PendingCall(rows)
        with self._pending_lock:
            self._pending.append(call)
        with self._lock:
            while not call.finished:
                self._run_calls(self._take_pending())
        if call.error is not None:
            raise call.error
        return call.trajectories

    def _take_pending(self) -> list[_PendingCall]:
        with self._pending_lock:
            taken: list[_PendingCall] = []
            n_rows = 0
            while self._pending and (not taken or n_rows + len(self._pending[0].rows) <= self.config.batch_size):
                taken.append(self._pending.popleft())
                n_rows += len(taken[-1].rows)
            return taken

    def _run_calls(self, calls: list[_PendingCall]) -> None:
        """One model run over the rows of ``calls``; each gets its trajectories, or the error."""
        try:
            trajectories = self._run_rows([row for call in calls for row in call.rows])
        except BaseException as error:  # handed to every call of the run, raised in its own thread
            for call in calls:
                call.error, call.finished = error, True
            if not isinstance(error, Exception):  # an interrupt also stops this thread
                raise
            return
        start = 0
        for call in calls:
            call.trajectories, call.finished = trajectories[start:start + len(call.rows)], True
            start += len(call.rows)

    def _run_rows(self, rows: list[dict]):
        """The agent loop over validated task rows (the caller holds the model lock)."""
        # task ids only need to be unique within one run: coalesced calls may repeat a user
        rows = [{**row, "task_id": f"{row['task_id']}/{n}"} for n, row in enumerate(rows)]
        by_id = {row["task_id"]: row for row in rows}
        budget = self.config.output_budget_chars

        def toolbox(task: AgentTask) -> Toolbox:
            row = by_id[task.task_id]
            return Toolbox(self.indexes[row["dataset"]], row, output_budget_chars=budget)

        tasks = [AgentTask.from_mapping(row, history_lines(toolbox(AgentTask.from_mapping(row)),
                                                           self.config.prompt_history_len))
                 for row in rows]
        return run_agent(tasks, self.backend, toolbox, self.config.agent_config())

    def rank(self, requests: Sequence[Mapping]) -> list[dict]:
        """``{"ranking", "valid", "n_tool_calls", "trajectory"}`` per request, in order."""
        return [
            {
                "ranking": list(t.final_ranking),
                "valid": bool(t.valid),
                "n_tool_calls": int(t.n_tool_calls),
                "trajectory": json.dumps(t.messages, ensure_ascii=False),
            }
            for t in self.run(requests)
        ]
