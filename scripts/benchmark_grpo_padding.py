"""What GRPO's log-prob passes cost on a padded generation batch, as TRL runs them and with
``trim_padding`` and ``shared_prompts`` (``training/grpo_trainer.py``), in the same run, on the
same rows.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_grpo_padding.py --model assets/base_model \\
        --trajectories assets/filtered_trajectories/trajectories.jsonl [--rollouts 16] [--micro-batch 2] \\
        [--group-size 1] [--ragged SHARE] [--modes MODE ...] [--reference-only] [--precision auto] \\
        [--json-out FILE]

The batch stands in for one demo step's rollouts: ``--rollouts`` kept teacher trajectories
(the SFT policy imitates them: the same turns, tool calls and lengths), each split where its
first assistant turn starts into prompt and completion, padded as TRL pads a generation batch
(prompts on the left, completions on the right). The sampled tokens are the assistant turns'.
With ``--group-size N`` the rows form groups of ``N`` that share a prompt, as a GRPO group's
rollouts do: each row keeps its completion behind its group's first row's prompt. Kept
trajectories are alike in length; ``--ragged SHARE`` cuts each completion to a seeded random
share of it, as sampled rollouts differ.
Each mode runs what a demo step runs after generation, through a rank-16 LoRA at the training
precision:

- the reference pass: every row, no gradient, in chunks of the micro-batch;
- the loss passes: micro-batches (shuffled, seeded, as TRL shuffles the batch; with
  ``shared_prompts`` regrouped by prompt, as the trainer regroups them), forward and backward of
  their sampled tokens' log-probs.

The modes: TRL's padded passes in micro-batches of ``--micro-batch`` (the demo recipe's
``per_device_train_batch_size``); the same trimmed; trimmed in micro-batches of 1 (a row alone
has no padding left, so the attention runs causal, without a mask); that with ``shared_prompts``
(each pass runs each distinct prompt of its rows once: the reference pass each group's, a loss
micro-batch of one rollout its own); trimmed with ``shared_prompts`` in micro-batches of
``--micro-batch`` (where a loss micro-batch holds rollouts of one group, their prompt runs once).
``--modes`` picks some of them (``padded trimmed trimmed-1 shared-1 shared``, the first is the
baseline). ``--reference-only`` times the reference pass alone, in every mode. Prints the
batch's padding share, seconds per mode and pass, the speed-ups against the first mode, and the
mean and largest log-prob difference to it on the sampled tokens (round-off only: in fp32 about
1e-5; in bf16 the passes' other shapes round differently).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from recthinker_dagster.training.data import IGNORE_INDEX, tokenized_trajectory_file


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--trajectories", type=Path, required=True, help="kept trajectories (jsonl)")
    parser.add_argument("--rollouts", type=int, default=16, help="rows of the generation batch (the demo's 2 x 8)")
    parser.add_argument("--micro-batch", type=int, default=2, help="the demo's per_device_train_batch_size")
    parser.add_argument("--group-size", type=int, default=1,
                        help="rows per shared prompt (the demo's groups: 8); 1: every row its own prompt")
    parser.add_argument("--ragged", type=float, metavar="SHARE",
                        help="cut each completion to a seeded random share between SHARE and 1 of its length, "
                             "as sampled rollouts differ in length (0.3: about a GRPO step's padding)")
    parser.add_argument("--reference-only", action="store_true", help="time the reference pass alone (no loss passes)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which modes to run, in this order (the first is the baseline)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args()


def _split(row: dict) -> int:
    return int(torch.tensor(row["labels"]).ne(IGNORE_INDEX).nonzero()[0])


def with_group_prompts(rows: list[dict], group_size: int) -> list[dict]:
    """``rows`` in consecutive groups of ``group_size``, each row's completion behind its group's
    first row's prompt."""
    grouped = []
    for r, row in enumerate(rows):
        leader = rows[r - r % group_size]
        lead, own = _split(leader), _split(row)
        grouped.append({"input_ids": leader["input_ids"][:lead] + row["input_ids"][own:],
                        "labels": [IGNORE_INDEX] * lead + row["labels"][own:]})
    return grouped


def ragged(rows: list[dict], shortest: float, seed: int = 0) -> list[dict]:
    """``rows`` with each completion cut to a seeded uniform share between ``shortest`` and 1 of
    its length: sampled rollouts differ in length far more than kept trajectories do."""
    generator = torch.Generator().manual_seed(seed)
    cut = []
    for row in rows:
        split = _split(row)
        share = shortest + (1 - shortest) * float(torch.rand((), generator=generator))
        end = split + max(1, round((len(row["input_ids"]) - split) * share))
        cut.append({"input_ids": row["input_ids"][:end], "labels": row["labels"][:end]})
    return cut


def generation_batch(rows: list[dict], pad_id: int):
    """TRL's layout of ``rows`` split at their first labelled token: ``(ids, attention, sampled,
    completion width)``, ``sampled`` marking the completion positions that were assistant tokens."""
    splits = [_split(row) for row in rows]
    prompt_width = max(splits)
    completion_width = max(len(row["input_ids"]) - split for row, split in zip(rows, splits))
    ids = torch.full((len(rows), prompt_width + completion_width), pad_id)
    attention = torch.zeros_like(ids)
    sampled = torch.zeros(len(rows), completion_width, dtype=torch.bool)
    for r, (row, split) in enumerate(zip(rows, splits)):
        start, end = prompt_width - split, prompt_width + len(row["input_ids"]) - split
        ids[r, start:end] = torch.tensor(row["input_ids"])
        attention[r, start:end] = 1
        labelled = torch.tensor(row["labels"][split:]) != IGNORE_INDEX
        sampled[r, : labelled.shape[0]] = labelled
    return ids, attention, sampled, completion_width


def prompt_grouped_order(ids, attention, keep: int, order: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """``order`` as the trainer regroups its micro-batches of ``micro_batch`` rows with
    ``shared_prompts`` (``grpo_trainer.micro_batches_by_prompt``)."""
    from recthinker_dagster.training.grpo_trainer import micro_batches_by_prompt

    prompt_width = ids.shape[1] - keep
    batches = [{"prompt_ids": ids[rows, :prompt_width], "prompt_mask": attention[rows, :prompt_width],
                "completion_mask": attention[rows, prompt_width:], "row": rows} for rows in order.split(micro_batch)]
    return torch.cat([batch["row"] for batch in micro_batches_by_prompt(batches)])


def run_mode(model, trainer, batch, micro_batch: int, order: torch.Tensor, loss_passes: bool = True) -> dict:
    ids, attention, sampled, keep = batch
    trainer.receive_trained_masks(sampled.int().tolist())
    started = time.perf_counter()
    with torch.no_grad():
        reference, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, keep,
                                                                     batch_size=micro_batch)
    reference_s = time.perf_counter() - started
    trainer.receive_trained_masks(None)
    if trainer.shared_prompts:  # the trainer regroups its micro-batches by prompt
        order = prompt_grouped_order(ids, attention, keep, order, micro_batch)
    started = time.perf_counter()
    for start in range(0, len(order) if loss_passes else 0, micro_batch):
        rows = order[start:start + micro_batch]
        trainer._loss_trained = sampled[rows]
        trainer._loss_allowed = None
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids[rows], attention[rows], keep,
                                                                 compute_entropy=True)
        (-(logps * sampled[rows]).sum() / sampled[rows].sum()).backward()
        trainer._loss_trained = None
    loss_s = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return {"reference_s": round(reference_s, 2), "loss_s": round(loss_s, 2),
            "total_s": round(reference_s + loss_s, 2), "logps": reference}


MODES = ("padded", "trimmed", "trimmed-1", "shared-1", "shared")


def benchmark_modes(names: list[str], micro_batch: int) -> dict[str, tuple[bool, int, bool]]:
    """The modes ``names`` (``MODES``) as label: (trim_padding, micro-batch, shared_prompts), in
    order; a mode that runs as an earlier one does (``--micro-batch 1``) is left out."""
    settings = {"padded": (False, micro_batch, False), "trimmed": (True, micro_batch, False),
                "trimmed-1": (True, 1, False), "shared-1": (True, 1, True), "shared": (True, micro_batch, True)}
    modes: dict[str, tuple[bool, int, bool]] = {}
    for name in names:
        trim, size, shared = settings[name]
        label = f"{'trimmed' if trim else 'padded'}, micro-batches of {size}{', shared prompts' if shared else ''}"
        modes.setdefault(label, (trim, size, shared))
    return modes


def main() -> None:
    args = parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template
    from recthinker_dagster.training.device import load_dtype, resolve_precision
    from recthinker_dagster.training.grpo_trainer import ConstrainedAnswerGRPOTrainer

    torch.manual_seed(0)
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(args.model), "auto")
    rows = with_group_prompts(tokenized_trajectory_file(tokenizer, args.trajectories, args.rollouts), args.group_size)
    if args.ragged is not None:
        rows = ragged(rows, args.ragged)
    batch = generation_batch(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    ids, attention, sampled, keep = batch
    precision = resolve_precision(args.precision, torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=load_dtype(precision))
    lora = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lora)
    model.train()
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))
    result: dict = {"precision": precision, "threads": torch.get_num_threads(), "rollouts": ids.shape[0],
                    "micro_batch": args.micro_batch, "group_size": args.group_size, "width": ids.shape[1],
                    "real_tokens_mean": round(float(attention.sum(dim=1).float().mean()), 1),
                    "padding_share": round(1 - float(attention.float().mean()), 3)}
    print(f"{result['rollouts']} rollouts padded to {result['width']} tokens ({result['real_tokens_mean']:.0f} real on "
          f"average, {result['padding_share']:.1%} padding); {precision}, {result['threads']} threads", flush=True)
    trainer = ConstrainedAnswerGRPOTrainer.scoring_only(model, autocast=autocast)
    run_mode(model, trainer, batch, args.micro_batch, order[: args.micro_batch])  # warm-up
    modes = benchmark_modes(args.modes, args.micro_batch)
    logps = {}
    result["modes"] = {}
    for mode, (trim, micro_batch, shared) in modes.items():
        trainer.trim_padding, trainer.shared_prompts = trim, shared
        figures = run_mode(model, trainer, batch, micro_batch, order, loss_passes=not args.reference_only)
        logps[mode] = figures.pop("logps")
        result["modes"][mode] = figures
        print(f"{mode}: reference pass {figures['reference_s']:.1f} s, loss passes {figures['loss_s']:.1f} s, "
              f"total {figures['total_s']:.1f} s", flush=True)
    baseline = next(iter(modes))
    for mode in list(modes)[1:]:
        difference = (logps[baseline] - logps[mode])[sampled].abs()
        result["modes"][mode].update(
            speedup=round(result["modes"][baseline]["total_s"] / result["modes"][mode]["total_s"], 3),
            mean_abs_logp_difference=float(difference.mean()), max_logp_difference=float(difference.max()))
        figures = result["modes"][mode]
        print(f"{mode}: {figures['speedup']:.2f}x against {baseline}; log-prob difference on sampled tokens: "
              f"mean {figures['mean_abs_logp_difference']:.2e}, largest {figures['max_logp_difference']:.2e}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
