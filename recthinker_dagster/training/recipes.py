"""SFT recipes: every hyperparameter of a training run, in versioned files under ``recipes/``.

    recipe = load_recipe("smoke")                     # recipes/sft_smoke.yaml
    recipe = load_recipe("path/to/my_recipe.yaml")    # or .json
    recipe = recipe.with_overrides(max_steps=2, save_steps=1)

A recipe file is a flat mapping of ``SFTRecipe`` fields (unknown keys are an error) plus one
section handed on as it is: ``filter`` (``FilterConfig`` fields). How the trained adapter is
validated is a run setting, not a recipe field (``sft.validation`` in ``profiles/<name>.yaml``).
Names resolve to ``sft_<name>.yaml`` in the recipe
folder: ``$RECTHINKER_RECIPES_DIR`` if set, else ``recipes/`` at the repository root.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from recthinker_dagster.training.filtering import FilterConfig
from recthinker_dagster.typed import typed_scalar

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class RecipeFields:
    """What SFT and RL recipes share: loading from a mapping (unknown keys are an error),
    plain-dict export, overrides and a digest. Subclasses are frozen dataclasses."""

    _KIND = "recipe"  # named in the unknown-keys error
    _MAPPINGS: tuple[str, ...] = ()  # sections kept as plain dicts
    # where a run executes, not what it learns: left out of the digest (a 2-process run of a recipe
    # keeps its global batch, so it resumes and compares with the 1-process run)
    _PLACEMENT: tuple[str, ...] = ("num_processes",)

    @classmethod
    def from_dict(cls, values: Mapping):
        values = dict(values)
        unknown = set(values) - {f.name for f in fields(cls)}  # type: ignore[arg-type]  # subclasses are dataclasses
        if unknown:
            raise ValueError(f"unknown {cls._KIND} keys: {sorted(unknown)}")
        if "lora_target_modules" in values:
            values["lora_target_modules"] = tuple(values["lora_target_modules"])
        for name in cls._MAPPINGS:
            if name in values:
                values[name] = dict(values[name] or {})
        for spec in fields(cls):  # type: ignore[arg-type]
            if spec.name in values:
                values[spec.name] = typed_scalar(cls._KIND, spec.name, str(spec.type), values[spec.name])
        return cls(**values)

    lora_target_modules: tuple[str, ...]  # every recipe has LoRA targets

    def to_dict(self) -> dict:
        values = asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
        values["lora_target_modules"] = list(self.lora_target_modules)
        return values

    def with_overrides(self, **overrides):
        return type(self).from_dict({**self.to_dict(), **overrides})

    num_processes: int  # data-parallel processes (SFT and RL recipes)
    gradient_accumulation_steps: int

    def _check_processes(self) -> None:
        if self.num_processes < 1 or self.gradient_accumulation_steps % self.num_processes:
            raise ValueError(f"num_processes ({self.num_processes}) must be >= 1 and divide gradient_accumulation_steps "
                             f"({self.gradient_accumulation_steps}): each process accumulates an equal share of the "
                             "global batch")

    @property
    def digest(self) -> str:
        """A short hash of every field but the placement ones: two runs with the same digest
        used the same recipe."""
        text = json.dumps({k: v for k, v in self.to_dict().items() if k not in self._PLACEMENT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SFTRecipe(RecipeFields):
    _KIND = "recipe"
    _MAPPINGS = ("filter",)

    name: str
    version: int = 1
    description: str = ""
    base_model: str | None = None  # None: the pipeline's base model; a folder for a larger backbone
    chat_template: str = "auto"  # see agent.backends.chat_template.ensure_tool_chat_template
    # LoRA adapter
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    # optimisation
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_length: int = 3072  # longer conversations are dropped, never cut (keep filter.max_tokens <= this)
    # precision and device: "auto" is bf16 on GPUs that have it and on CPUs with AMX / AVX512-BF16
    precision: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    num_threads: int | None = None  # CPU threads; None: every core this process may use
    # data parallelism: this many processes under `accelerate launch` (DDP: gloo on CPU, NCCL on
    # GPUs), each accumulating gradient_accumulation_steps / num_processes micro-batches, so the
    # global batch stays per_device_train_batch_size x gradient_accumulation_steps
    num_processes: int = 1
    # logging, checkpoints, reproducibility
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = 2
    seed: int = 2026
    # the trajectory filter (FilterConfig fields), handed on unchanged
    filter: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lora_r < 1 or self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("lora_r, per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.save_steps < 1 or self.logging_steps < 1:
            raise ValueError("save_steps and logging_steps must be >= 1")
        self._check_processes()

    @property
    def filter_config(self) -> FilterConfig:
        return FilterConfig.from_dict(self.filter)


def recipes_dir() -> Path:
    override = os.environ.get("RECTHINKER_RECIPES_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "recipes"


def recipe_path(name_or_path: str | os.PathLike, kind: str = "sft") -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        return path
    return recipes_dir() / f"{kind}_{name_or_path}.yaml"


def load_recipe(name_or_path: str | os.PathLike | SFTRecipe) -> SFTRecipe:
    """A recipe by name (``smoke``, ``demo``, ``full``) or from a ``.yaml``/``.json`` file."""
    if isinstance(name_or_path, SFTRecipe):
        return name_or_path
    return SFTRecipe.from_dict(read_recipe_file(recipe_path(name_or_path), "sft"))


def read_recipe_file(path: Path, kind: str) -> dict:
    """The mapping in a recipe file, with ``name`` defaulting to the file's stem."""
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}; named {kind} recipes: {available_recipes(kind)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, Mapping):
        raise TypeError(f"{path} must hold a mapping of recipe fields")
    values = dict(values)
    values.setdefault("name", path.stem.removeprefix(f"{kind}_"))
    return values


def available_recipes(kind: str = "sft") -> list[str]:
    return sorted(p.stem.removeprefix(f"{kind}_") for p in recipes_dir().glob(f"{kind}_*.yaml"))
