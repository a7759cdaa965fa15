"""What the training passes cost with TRL's fused LM head as it runs on CPU (every position
projected) and with the head on the trained positions only (``training/scored_head.py``), in
the same run, on the same examples.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_training_step.py --model assets/base_model \\
        --trajectories assets/filtered_trajectories/trajectories.jsonl [--examples 8] [--repeats 2] \\
        [--lora-dropout 0.05] [--precision fp32]

Examples are kept teacher trajectories rendered as the SFT stage renders them (labels on the
assistant turns). Each pass is one example's forward and backward through a rank-16 LoRA, at
the precision training picks on this machine (``--precision auto``; ``bf16`` or ``fp32`` to
compare them on one host):

- ``sft``: SFTTrainer's pass: the assistant turns are labelled;
- ``grpo``: GRPO's pass over a rollout: everything from the first assistant token on is the
  completion; TRL's head scores every completion position, the compact head only the tokens
  the policy sampled (here, the assistant turns). Both losses are taken over the sampled
  tokens, as GRPO's loss is.

Prints seconds per example for both heads, their ratio, and the largest loss difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from recthinker_dagster.training.data import IGNORE_INDEX, tokenized_trajectory_file
from recthinker_dagster.training.scored_head import project_labelled_positions_only


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--trajectories", type=Path, required=True, help="kept trajectories (jsonl)")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per example and head")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="the recipes' is 0 (sft_demo v6 on)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: what training picks here (training/device.py, resolve_precision)")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args()


def lora_models(model_dir: Path, lora_dropout: float, precision: str):
    """(TRL's fused head, the compact head) on two copies of one LoRA model, and the autocast."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from recthinker_dagster.training.device import load_dtype, resolve_precision

    precision = resolve_precision(precision, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype(precision))
    add_fused_lm_head(base, outputs=("log_probs", "entropy"))
    compact_base = copy.deepcopy(base)
    project_labelled_positions_only(compact_base)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    models = get_peft_model(base, lora), get_peft_model(compact_base, copy.deepcopy(lora))
    for model in models:
        model.train()  # as in training: dropout (if any) active
    return *models, autocast, precision


def one_pass(model, ids: torch.Tensor, labels: torch.Tensor, trained: torch.Tensor, autocast) -> tuple[float, float]:
    """Seconds for one forward + backward, and the loss (mean negative log-prob of the trained tokens)."""
    started = time.perf_counter()
    with autocast():
        output = model(input_ids=ids, labels=labels, fused_lm_head=True)
    loss = -(output.log_probs * trained).sum() / trained.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, float(loss.detach())


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template

    torch.manual_seed(0)
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(args.model), "auto")
    rows = tokenized_trajectory_file(tokenizer, args.trajectories, args.examples)
    trl_model, compact_model, autocast, precision = lora_models(args.model, args.lora_dropout, args.precision)
    seconds: dict = {(mode, head): [] for mode in ("sft", "grpo") for head in ("trl", "compact")}
    loss_gap = {"sft": 0.0, "grpo": 0.0}
    tokens = labelled = 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        trained = (labels[:, 1:] != IGNORE_INDEX).float()
        first = int((labels[0] != IGNORE_INDEX).nonzero()[0])
        completion = ids.clone()
        completion[:, :first] = IGNORE_INDEX  # GRPO: TRL labels every completion position
        tokens += ids.shape[1]
        labelled += int(trained.sum())
        for mode, trl_labels in (("sft", labels), ("grpo", completion)):
            one_pass(trl_model, ids, trl_labels, trained, autocast)  # warm-up
            one_pass(compact_model, ids, labels, trained, autocast)
            for _ in range(args.repeats):
                t_trl, loss_trl = one_pass(trl_model, ids, trl_labels, trained, autocast)
                t_compact, loss_compact = one_pass(compact_model, ids, labels, trained, autocast)
                seconds[mode, "trl"].append(t_trl)
                seconds[mode, "compact"].append(t_compact)
                loss_gap[mode] = max(loss_gap[mode], abs(loss_trl - loss_compact))
    result = {"precision": precision, "threads": torch.get_num_threads(), "examples": len(rows),
              "lora_dropout": args.lora_dropout,
              "mean_tokens": tokens / len(rows), "labelled_share": labelled / tokens}
    print(f"{len(rows)} examples, {result['mean_tokens']:.0f} tokens on average, "
          f"{result['labelled_share']:.1%} of them trained; {precision}, {result['threads']} threads, "
          f"LoRA dropout {args.lora_dropout}")
    for mode in ("sft", "grpo"):
        trl_s, compact_s = (statistics.fmean(seconds[mode, head]) for head in ("trl", "compact"))
        result[mode] = {"trl_s": round(trl_s, 3), "compact_s": round(compact_s, 3),
                        "speedup": round(trl_s / compact_s, 3), "max_loss_difference": loss_gap[mode]}
        print(f"{mode}: TRL head {trl_s:.2f} s/example, compact head {compact_s:.2f} s/example "
              f"({trl_s / compact_s:.2f}x); largest loss difference {loss_gap[mode]:.2e}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
