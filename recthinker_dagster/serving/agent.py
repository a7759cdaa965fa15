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
Item id lists may also be JSON strings (``'["1193", "661"]'``). Without a history, the user's
history is the one the tools see: the user's interactions in the user-profile index (the
training-visible interactions, oldest first; for users of the training tasks this leaves out
their training target, exactly as during training). A request for an unknown dataset or user,
with unknown item ids, duplicate candidates or fewer than 2 candidates raises ``ValueError``
naming the bad value, before anything runs. The tasks have no target (``target_item_id`` is
``""``), so the trajectories' metrics are meaningless and are not returned.

Each ``rank`` call runs the real agent loop (:func:`~recthinker_dagster.agent.run_agent`)
over all its requests as one batch; calls are serialized by a lock (one model, one cache).
No Dagster, MLflow or DVC here.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from recthinker_dagster.agent import AgentConfig, AgentTask, SamplingParams, run_agent
from recthinker_dagster.agent.history import history_lines
from recthinker_dagster.models.loading import load_agent_model as load_merged_model
from recthinker_dagster.tools import INDEX_NAMES, Toolbox, ToolIndexes

MIN_CANDIDATES = 2
REQUEST_KEYS = ("dataset", "user_id", "candidate_item_ids", "history_item_ids")
RESULT_KEYS = ("ranking", "valid", "n_tool_calls", "trajectory")
NO_TARGET = ""  # serving tasks have no held-out target
SERVING_SPLIT = "serving"


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
    output_budget_chars: int = 1200  # the tools' own output budget
    dtype: str = "auto"  # auto, bfloat16, float16 or float32
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    chat_template: str = "auto"  # auto, qwen2_5 or keep (see agent/backends/chat_template.py)

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tool_calls < 0 or self.max_new_tokens < 1:
            raise ValueError("max_turns and max_new_tokens must be >= 1 and max_tool_calls >= 0")
        if self.prompt_history_len < 0 or self.batch_size < 1:
            raise ValueError("prompt_history_len must be >= 0 and batch_size >= 1")

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
        raise ValueError(f"{what} must be a list of item ids, got {type(value).__name__} {str(value)[:80]!r}")  # noqa: TRY004 - a bad request
    bad = [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{what} must hold string (or integer) item ids, got {bad[:3]!r}")
    return [str(v) for v in value]


def _preview(values: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


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
        model, tokenizer = load_merged_model(self.base_model_dir, self.adapter_dirs,
                                             dtype=config.dtype, device=config.device)
        from recthinker_dagster.agent.backends.transformers_backend import (
            TransformersBackend,
        )

        name = "recthinker:" + "+".join([Path(self.base_model_dir).name, *(Path(a).name for a in self.adapter_dirs)])
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
        self._lock = threading.Lock()

    @classmethod
    def load(cls, base_model_dir, adapter_dirs=(), tool_indexes=None, config=None) -> RecThinkerAgent:
        """Shorthand for ``AgentBundle(...).load()``."""
        return AgentBundle(base_model_dir, adapter_dirs, tool_indexes or {}, config).load()

    @property
    def datasets(self) -> list[str]:
        return sorted(self.indexes)

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
        dataset = str(request["dataset"])
        indexes = self.indexes.get(dataset)
        if indexes is None:
            raise ValueError(f"{where}: unknown dataset {dataset!r}; this agent serves {self.datasets}")
        user = str(request["user_id"])
        profiles = indexes.profiles
        stored = profiles.history(user)
        if stored is None and user not in profiles.meta.get("demographics", {}):
            raise ValueError(f"{where}: unknown user {user!r} in dataset {dataset!r} (not in its user-profile index)")
        candidates = id_list(request["candidate_item_ids"], f"{where}: candidate_item_ids") or []
        if len(candidates) < MIN_CANDIDATES:
            raise ValueError(f"{where}: {len(candidates)} candidate(s) given ({_preview(candidates)}); "
                             f"rank at least {MIN_CANDIDATES}")
        duplicates = sorted({c for c in candidates if candidates.count(c) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicate candidate item ids {_preview(duplicates)}")
        history = id_list(request.get("history_item_ids"), f"{where}: history_item_ids")
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
        """The agent's :class:`~recthinker_dagster.agent.Trajectory` per request, in order."""
        rows = self.task_rows(list(requests))
        if not rows:
            return []
        by_id = {row["task_id"]: row for row in rows}
        budget = self.config.output_budget_chars

        def toolbox(task: AgentTask) -> Toolbox:
            row = by_id[task.task_id]
            return Toolbox(self.indexes[row["dataset"]], row, output_budget_chars=budget)

        tasks = [AgentTask.from_mapping(row, history_lines(toolbox(AgentTask.from_mapping(row)),
                                                           self.config.prompt_history_len))
                 for row in rows]
        with self._lock:
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
