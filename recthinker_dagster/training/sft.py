"""Supervised fine-tuning of the agent on filtered trajectories: TRL's SFTTrainer + a LoRA adapter.

    result = train_sft(kept_trajectories, "assets/base_model", ".work/sft_model/run", load_recipe("smoke"))
    result.adapter_dir, result.metrics["final_loss"]

Data: ``training.data`` (assistant-only labels, conversations longer than ``recipe.max_length``
dropped). Device and precision: ``training.device``; gradient checkpointing is off unless the
recipe asks for it (on CPU it only costs time). Checkpoints go to ``output_dir/checkpoints``
every ``save_steps``; a rerun resumes from the last one. ``output_dir/adapter`` holds the
adapter, its config and the tokenizer with the inference chat template;
``output_dir/metrics.json`` the run's numbers. Validate the adapter with
``training.validation.evaluate_policy``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.training.data import IGNORE_INDEX, sft_examples, tokenize_examples
from recthinker_dagster.training.device import (
    data_parallel_arguments,
    load_dtype,
    resolve_precision,
    torch_threads,
    training_device,
    world_size,
)
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.json"


@dataclass
class SFTResult:
    output_dir: Path
    adapter_dir: Path
    metrics_path: Path
    metrics: dict
    global_step: int
    resumed_from: str | None  # the checkpoint this run continued from


class _CountingCollator:
    """Wraps the trainer's collator to count the tokens (all, and labelled) it hands out."""

    def __init__(self, inner):
        self.inner, self.tokens, self.trained_tokens = inner, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


def sft_config(recipe: SFTRecipe, checkpoint_dir: Path, precision: str, use_cpu: bool):
    """The TRL config for a recipe: bf16 / gradient checkpointing set explicitly (TRL defaults
    both to True), labels precomputed (so no ``assistant_only_loss`` here), no reporting. Under
    a data-parallel launch each process accumulates its share of the recipe's global batch."""
    from trl import SFTConfig

    return SFTConfig(
        **data_parallel_arguments(recipe.gradient_accumulation_steps, use_cpu),
        output_dir=str(checkpoint_dir),
        max_steps=recipe.max_steps,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        max_length=recipe.max_length,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # transformers 5 renamed it; setting the new name keeps TRL's default (True) out of the way
        activation_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing=recipe.gradient_checkpointing,
        use_cpu=use_cpu,
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to="none",
        dataloader_pin_memory=not use_cpu,
        disable_tqdm=True,
        packing=False,
        assistant_only_loss=False,
    )


def train_sft(
    trajectories_or_records: Iterable[Trajectory | Mapping],
    base_model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: SFTRecipe | str,
    *,
    resume: bool = True,
    callbacks: Sequence | None = None,
) -> SFTResult:
    """Train a LoRA adapter on the trajectories (see the module docstring).

    ``resume=True`` continues from the last checkpoint in ``output_dir/checkpoints`` (same data
    order, optimizer, scheduler and RNG state); ``resume=False`` deletes those checkpoints first.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )
    from recthinker_dagster.training.callbacks import StepClock
    from recthinker_dagster.training.scored_head import project_labelled_positions_only

    recipe = load_recipe(recipe)
    output_dir, base_model_dir = Path(output_dir), Path(base_model_dir)
    checkpoint_dir = output_dir / CHECKPOINTS
    set_seed(recipe.seed)
    device = training_device(recipe.device, recipe.num_threads)
    precision = resolve_precision(recipe.precision, device)

    # data: rendered with the agent's tool template, labels on the assistant turns only
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(base_model_dir), recipe.chat_template)
    rows, data_stats = tokenize_examples(tokenizer, sft_examples(trajectories_or_records), recipe.max_length)
    if not rows:
        raise ValueError(f"no training example fits max_length={recipe.max_length}: {data_stats}")
    from datasets import Dataset

    dataset = Dataset.from_list(rows)

    # model: frozen base + LoRA on the attention and MLP projections
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=load_dtype(precision))
    lora = LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM",
    )
    collator = _CountingCollator(DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, checkpoint_dir, precision, use_cpu=device.type == "cpu"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        data_collator=collator,
        callbacks=[clock, *(callbacks or [])],
    )

    # the LM head runs on the labelled (assistant) positions only, where TRL's CPU path runs it on all
    project_labelled_positions_only(trainer.model)

    # train, continuing from the last checkpoint when there is one (resume=False starts over)
    if not resume and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - started

    # save the adapter (not the base weights) with the tokenizer and its inference template;
    # under a data-parallel launch every process holds the same weights, and the first writes
    adapter_dir = output_dir / ADAPTER
    metrics = _run_metrics(trainer, output, clock, collator, train_seconds, recipe, precision, device,
                           data_stats, last)
    metrics_path = output_dir / METRICS
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        metrics_path.write_text(json.dumps(metrics, indent=2))
    return SFTResult(output_dir, adapter_dir, metrics_path, metrics, trainer.state.global_step,
                     Path(last).name if last else None)


def _run_metrics(trainer, output, clock, collator, train_seconds, recipe, precision, device,
                 data_stats, resumed_from) -> dict:
    history = trainer.state.log_history
    keys = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens")
    steps = [{"step": entry["step"], **{k: entry[k] for k in keys if k in entry}}
             for entry in history if "loss" in entry]
    n_steps = len(clock.step_seconds)
    return {
        "recipe": recipe.name,
        "recipe_version": recipe.version,
        "recipe_digest": recipe.digest,
        "recipe_config": recipe.to_dict(),
        "precision": precision,
        "device": str(device),
        "torch_threads": torch_threads(device),
        "num_processes": world_size(),
        "global_step": trainer.state.global_step,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "steps_this_run": n_steps,
        "steps": steps,
        "final_loss": steps[-1]["loss"] if steps else None,
        "train_loss": output.training_loss if not math.isnan(output.training_loss) else None,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(statistics.fmean(clock.step_seconds), 3) if n_steps else None,
        "step_seconds": [round(s, 3) for s in clock.step_seconds],
        "tokens_seen": collator.tokens,  # this process's share under a data-parallel launch
        "trained_tokens_seen": collator.trained_tokens,
        "tokens_per_second": round(collator.tokens / train_seconds, 2) if train_seconds else None,
        "trained_tokens_per_second": round(collator.trained_tokens / train_seconds, 2) if train_seconds else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **data_stats,
    }
