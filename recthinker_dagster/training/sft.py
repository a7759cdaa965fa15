"""Supervised fine-tuning of the agent on filtered trajectories: TRL's SFTTrainer + a LoRA adapter.

    result = train_sft(kept_trajectories, "assets/base_model", "assets/sft_model", load_recipe("smoke"))
    scores = evaluate_adapter("assets/base_model", result.adapter_dir, valid_tasks, toolbox_factory,
                              AgentConfig(max_turns=4))

Data. Each trajectory is one conversational example (its messages and tool schemas) rendered
with the agent's chat template: TRL's Qwen2.5 tool template, in the training variant that
``trl.chat_template_utils.get_training_chat_template`` returns, whose ``{% generation %}``
markers cover every assistant turn (its text, its ``<tool_call>`` blocks and ``<|im_end|>``).
Labels are the input ids with everything outside those markers set to -100, so the
system prompt, the tool schemas, the user turn and the tool results are never trained on.
This is exactly what ``SFTConfig(assistant_only_loss=True)`` computes, done here before the
trainer sees the data: a ``datasets.Dataset`` of raw messages would merge the ``arguments``
objects of different tools into one Arrow struct (``get_user_profile`` would be rendered with
``{"item_ids": null}``), so the trainer gets token ids and labels instead. Conversations
longer than ``recipe.max_length`` are dropped, never cut (a cut one would lose its answer).

Precision. ``auto`` is bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16,
fp32 elsewhere. bf16 loads the frozen base weights in bf16 and trains the LoRA weights in fp32
under bf16 autocast; gradient checkpointing is off unless the recipe asks for it (on CPU it
only costs time). Checkpoints go to ``output_dir/checkpoints`` every ``save_steps``; a rerun
resumes from the last one. ``output_dir/adapter`` holds the adapter, its config and the
tokenizer with the inference chat template; ``output_dir/metrics.json`` the run's numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe

IGNORE_INDEX = -100
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


# -- data ---------------------------------------------------------------------------------------


def sft_examples(items: Iterable[Trajectory | Mapping]) -> list[dict]:
    """``{"messages", "tools", "task_id"}`` per trajectory (objects, ``to_dict`` rows or plain
    ``{"messages", "tools"}`` mappings)."""
    examples = []
    for item in items:
        if isinstance(item, Trajectory):
            messages, tools, task_id = item.messages, item.tools, item.task_id
        else:
            messages, tools, task_id = item["messages"], item.get("tools"), item.get("task_id", "")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        examples.append({"messages": list(messages), "tools": list(tools or []), "task_id": task_id})
    return examples


def training_chat_template(tokenizer) -> str:
    """The tokenizer's (tool) template with ``{% generation %}`` markers around assistant turns."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    template = get_training_chat_template(tokenizer) or tokenizer.chat_template
    if not has_generation_markers(template):
        raise ValueError("no training chat template with generation markers for this tokenizer")
    return template


def tokenize_conversation(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None,
                          chat_template: str) -> dict[str, list[int]]:
    """Token ids and labels of one conversation: labels are -100 outside the assistant turns.

    The same call TRL's SFTTrainer makes for ``assistant_only_loss=True`` (``apply_chat_template``
    with ``return_assistant_tokens_mask``), followed by the same label rule."""
    out = tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, chat_template=chat_template,
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids, "labels": labels}


def tokenize_examples(tokenizer, examples: Sequence[dict], max_length: int | None,
                      chat_template: str | None = None) -> tuple[list[dict], dict]:
    """Tokenized examples that fit ``max_length`` and have trainable tokens, and counts."""
    chat_template = chat_template or training_chat_template(tokenizer)
    rows, too_long, no_labels, lengths = [], 0, 0, []
    for example in examples:
        row = tokenize_conversation(tokenizer, example["messages"], example["tools"], chat_template)
        if max_length is not None and len(row["input_ids"]) > max_length:
            too_long += 1
        elif all(label == IGNORE_INDEX for label in row["labels"]):
            no_labels += 1
        else:
            rows.append(row)
            lengths.append(len(row["input_ids"]))
    stats = {
        "n_examples": len(rows), "n_dropped_too_long": too_long, "n_dropped_no_labels": no_labels,
        "tokens_total": sum(lengths), "tokens_mean": statistics.fmean(lengths) if lengths else 0.0,
        "tokens_max": max(lengths, default=0),
        "trained_tokens_total": sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows),
    }
    return rows, stats


# -- device and precision -----------------------------------------------------------------------


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bf16`` where it is fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else ``fp32``."""
    import torch

    from recthinker_dagster.agent.backends.transformers_backend import cpu_has_fast_bf16

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def _load_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32  # fp16 keeps fp32 masters


# -- training ----------------------------------------------------------------------------------


class _CountingCollator:
    """Wraps the trainer's collator to count the tokens (all, and labelled) it hands out."""

    def __init__(self, inner):
        self.inner, self.tokens, self.trained_tokens = inner, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


def _clock_callback():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of every optimizer step of this run."""

        def __init__(self):
            self.start_step, self.step_seconds, self._last = 0, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step, self._last = state.global_step, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self._last = now

    return StepClock()


def sft_config(recipe: SFTRecipe, checkpoint_dir: Path, precision: str, use_cpu: bool):
    """The TRL config for a recipe: bf16 / gradient checkpointing set explicitly (TRL defaults
    both to True), labels precomputed (so no ``assistant_only_loss`` here), no reporting."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoint_dir),
        max_steps=recipe.max_steps,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
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
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )
    from recthinker_dagster.agent.backends.transformers_backend import (
        available_cores,
        resolve_device,
    )

    recipe = load_recipe(recipe)
    output_dir, base_model_dir = Path(output_dir), Path(base_model_dir)
    checkpoint_dir = output_dir / CHECKPOINTS
    set_seed(recipe.seed)
    device = resolve_device(recipe.device)
    if device.type == "cpu":
        torch.set_num_threads(recipe.num_threads or available_cores())
    precision = resolve_precision(recipe.precision, device)

    # data: rendered with the agent's tool template, labels on the assistant turns only
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(base_model_dir), recipe.chat_template)
    rows, data_stats = tokenize_examples(tokenizer, sft_examples(trajectories_or_records), recipe.max_length)
    if not rows:
        raise ValueError(f"no training example fits max_length={recipe.max_length}: {data_stats}")
    from datasets import Dataset

    dataset = Dataset.from_list(rows)

    # model: frozen base + LoRA on the attention and MLP projections
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=_load_dtype(precision))
    lora = LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM",
    )
    collator = _CountingCollator(DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
    clock = _clock_callback()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, checkpoint_dir, precision, use_cpu=device.type == "cpu"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        data_collator=collator,
        callbacks=[clock, *(callbacks or [])],
    )

    # train, continuing from the last checkpoint when there is one (resume=False starts over)
    if not resume and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - started

    # save the adapter (not the base weights) with the tokenizer and its inference template
    adapter_dir = output_dir / ADAPTER
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    metrics = _run_metrics(trainer, output, clock, collator, train_seconds, recipe, precision, device,
                           data_stats, last)
    metrics_path = output_dir / METRICS
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
        "torch_threads": _threads(device),
        "global_step": trainer.state.global_step,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "steps_this_run": n_steps,
        "steps": steps,
        "final_loss": steps[-1]["loss"] if steps else None,
        "train_loss": output.training_loss if not math.isnan(output.training_loss) else None,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(statistics.fmean(clock.step_seconds), 3) if n_steps else None,
        "step_seconds": [round(s, 3) for s in clock.step_seconds],
        "tokens_seen": collator.tokens,
        "trained_tokens_seen": collator.trained_tokens,
        "tokens_per_second": round(collator.tokens / train_seconds, 2) if train_seconds else None,
        "trained_tokens_per_second": round(collator.trained_tokens / train_seconds, 2) if train_seconds else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **data_stats,
    }


def _threads(device) -> int | None:
    import torch

    return torch.get_num_threads() if device.type == "cpu" else None


# -- evaluation ----------------------------------------------------------------------------------


def load_agent_model(base_model_dir: str | os.PathLike,
                     adapter_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                     dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer): the base model with every LoRA adapter merged in, in order (or the base alone).

    Adapter ``k`` is applied to the model with adapters ``0..k-1`` already merged: an RL adapter
    is trained on the SFT-merged model, so ``[sft_adapter, rl_adapter]`` rebuilds the RL policy.
    The tokenizer (and its chat template) comes from the last adapter folder holding one, else
    from the base model folder. A missing folder is a ``FileNotFoundError`` naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.agent.backends.transformers_backend import (
        available_cores,
        resolve_device,
        resolve_dtype,
    )

    base, adapters = Path(base_model_dir), adapter_list(adapter_dirs)
    for folder, what in [(base, "base model"), *((a, f"adapter {k}") for k, a in enumerate(adapters))]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    target = resolve_device(device)
    if target.type == "cpu":
        torch.set_num_threads(available_cores())
    tokenizer_dir = next((a for a in reversed(adapters) if (a / "tokenizer_config.json").is_file()), base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype, target))
    for adapter in adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(target).eval(), tokenizer


def adapter_list(adapter_dirs) -> list[Path]:
    """``None``, one folder or several, as a list of paths."""
    if adapter_dirs is None:
        return []
    if isinstance(adapter_dirs, (str, os.PathLike)):
        return [Path(adapter_dirs)]
    return [Path(a) for a in adapter_dirs]


def summarize_trajectories(trajectories: Sequence[Trajectory]) -> dict:
    """Mean ranking metrics, the valid-answer rate and tool use over a set of trajectories."""
    n = len(trajectories)
    if not n:
        return {"n_tasks": 0}

    def mean(values):
        return round(statistics.fmean(values), 4)

    summary = {"n_tasks": n}
    for key in ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"):
        summary[key] = mean(t.metrics.get(key, 0.0) for t in trajectories)
    summary.update(
        valid_rate=mean(t.valid for t in trajectories),
        answered_rate=mean(t.finish == "answer" for t in trajectories),
        tool_calls_per_task=mean(t.n_tool_calls for t in trajectories),
        invalid_calls_per_task=mean(t.n_invalid_calls for t in trajectories),
        turns_per_task=mean(t.n_turns for t in trajectories),
        completion_tokens_per_task=mean(t.completion_tokens for t in trajectories),
    )
    return summary


def evaluate_adapter(
    base_model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    tasks: Sequence,
    toolbox_factory: Callable,
    agent_config=None,
    *,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    return_trajectories: bool = False,
) -> dict:
    """Run the agent with the adapter merged into the base model (``adapter_dir=None``: the base
    model alone) on ``tasks``; NDCG@1/5/10, valid-answer rate, tool calls per task and more."""
    from recthinker_dagster.agent import AgentConfig, run_agent
    from recthinker_dagster.agent.backends.transformers_backend import (
        TransformersBackend,
    )

    model, tokenizer = load_agent_model(base_model_dir, adapter_dir, dtype=dtype, device=device)
    adapters = adapter_list(adapter_dir)
    name = f"adapter:{adapters[-1].parent.name}" if adapters else Path(base_model_dir).name
    backend = TransformersBackend(model, tokenizer, name=name, batch_size=batch_size)
    started = time.perf_counter()
    trajectories = run_agent(tasks, backend, toolbox_factory, agent_config or AgentConfig())
    summary = summarize_trajectories(trajectories)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["producer"] = name
    if return_trajectories:
        summary["trajectories"] = trajectories
    return summary
