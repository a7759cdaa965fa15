"""Real small artifacts for the serving tests: tool indexes, LoRA adapters, an MLflow registry.

``serving_world(base_model_dir)`` builds, once per test session, the tool indexes of a small
synthetic dataset and of ML-1M users 1-150 (when the shared data is there) saved as index
folders, plus two tiny LoRA adapters (rank 2, weights drawn from seeded generators so they
change the model's outputs) on the given base model: an "SFT" adapter saved with the
tokenizer and its tool chat template, and an "RL" adapter to merge on top of it.
``new_registry(root)`` points MLflow at a fresh SQLite store with artifacts under ``root``.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tests.support.paths import SHARED_DATA, has_shared

PROTOCOL = {"n_eval_users_per_group": 3, "n_valid_users_per_group": 3, "n_train_users_per_group": 3}
ML1M_USERS = 150
# fast and deterministic: the untrained model never calls a tool within 32 tokens, and the
# loop falls back to the candidates' order (or takes a partial answer, completed in order)
SERVING_CONFIG = {"max_turns": 1, "max_tool_calls": 2, "max_new_tokens": 32, "prompt_history_len": 5,
                  "batch_size": 4, "dtype": "auto", "device": "cpu"}
EXPERIMENT = "serving-tests"


@dataclass
class ServingWorld:
    root: Path
    base_model: Path
    adapters: list[Path]  # [sft, rl]
    tool_indexes: dict[str, dict[str, Path]]  # {dataset: {index name: folder}}
    tasks: dict[str, pl.DataFrame]
    dataset: str  # the dataset the tests send requests for

    def eval_task(self, k: int = 0) -> dict:
        return self.tasks[self.dataset].filter(pl.col("split") == "eval").row(k, named=True)

    def request(self, n_candidates: int = 5, k: int = 0, **overrides) -> dict:
        task = self.eval_task(k)
        request = {"dataset": self.dataset, "user_id": task["user_id"],
                   "candidate_item_ids": task["candidate_item_ids"][:n_candidates]}
        request.update(overrides)
        return request


def _datasets():
    from recthinker_dagster.data.sources import load_dataset
    from recthinker_dagster.data.synthetic import generate_synthetic

    out = {"synthetic": generate_synthetic(n_users=120, n_items=150, seed=3)}
    if has_shared("ml-1m"):
        data, _ = load_dataset("ml-1m", SHARED_DATA, allow_download=False)
        keep = pl.col("user_id").cast(pl.Int64) <= ML1M_USERS
        out["ml-1m"] = dataclasses.replace(data, interactions=data.interactions.filter(keep),
                                           users=data.users.filter(keep))
    return out


def build_tool_indexes(root: Path) -> tuple[dict[str, dict[str, Path]], dict[str, pl.DataFrame]]:
    """Index folders ``root/<asset>/<dataset>`` (the project's layout) and the task tables."""
    from recthinker_dagster.protocol import build_task_splits, protocol_config_for
    from recthinker_dagster.serving.pyfunc import INDEX_ASSETS
    from recthinker_dagster.tools import build_all, index_interactions

    folders, tasks = {}, {}
    for dataset, data in _datasets().items():
        splits = build_task_splits(data.interactions, protocol_config_for(dataset, **PROTOCOL), dataset)
        valid = splits.tasks.filter(pl.col("split") == "valid")
        indexes = build_all(index_interactions(splits.train_interactions, splits.tasks), data.items, data.users,
                            valid, {"bpr_epochs": 1, "sasrec_train_windows": 500})
        folders[dataset] = {}
        for name, asset in INDEX_ASSETS.items():
            folder = root / "assets" / asset / dataset
            getattr(indexes, name).save(folder)
            folders[dataset][name] = folder
        tasks[dataset] = splits.tasks
    return folders, tasks


def make_adapters(base_model_dir: Path, root: Path, seeds=(11, 12)) -> list[Path]:
    """Rank-2 LoRA adapters on q/v projections with seeded random weights (A and B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    folders = []
    for k, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        folder = root / ("sft" if k == 0 else "rl") / "adapter"
        model.save_pretrained(str(folder))
        if k == 0:  # like training/sft.py: the tokenizer with its inference chat template
            ensure_tool_chat_template(AutoTokenizer.from_pretrained(base_model_dir)).save_pretrained(str(folder))
        folders.append(folder)
    return folders


@functools.lru_cache(maxsize=2)
def serving_world(base_model_dir: Path) -> ServingWorld:
    root = Path(tempfile.mkdtemp(prefix="recthinker-serving-"))
    atexit.register(shutil.rmtree, root, True)
    folders, tasks = build_tool_indexes(root)
    adapters = make_adapters(Path(base_model_dir), root / "runs")
    dataset = "ml-1m" if "ml-1m" in folders else "synthetic"
    return ServingWorld(root, Path(base_model_dir), adapters, folders, tasks, dataset)


def new_registry(root: Path) -> str:
    """A fresh SQLite tracking/registry store under ``root``, set as MLflow's tracking URI."""
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").resolve().as_uri())
    return uri


def log_version(world: ServingWorld, adapters: list[Path] | None = None, **kwargs):
    from recthinker_dagster.serving.pyfunc import log_agent_model

    kwargs.setdefault("config", SERVING_CONFIG)
    kwargs.setdefault("experiment_name", EXPERIMENT)
    return log_agent_model(world.base_model, world.adapters[:1] if adapters is None else adapters,
                           world.tool_indexes, **kwargs)
