"""Does GRPO have signal? A GRPO run on an SFT adapter, with its health figures per step.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/grpo_signal.py --root DIR \\
        [--sft-adapter DIR/adapter] [--recipe demo] [--set FIELD=VALUE ...] [--datasets ml-1m amazon-cds] \\
        [--answer-mode generate] [--out DIR]

Reads the published tasks, tool indexes and ``assets/base_model`` under ``--root`` (build them
with the pipeline or ``scripts/sft_learning_curve.py``), takes the recipe's ``n_train_tasks``
train tasks per dataset (group-balanced, as the ``rl_model`` stage does) and trains the RL
adapter on top of ``--sft-adapter`` (without one: on the base model, as ``--recipe reczero``
does) with ``training.grpo.train_grpo``. ``--set`` overrides recipe
fields (``--set max_steps=16 --set learning_rate=1e-4``). Prints per step: reward (mean, std),
``frac_reward_zero_std``, the reward components, tool calls, valid rate, completion length,
the sampler-trainer log-prob gap and seconds; then the mean reward of the first and last
quarter of the steps with their standard errors, the mean ``frac_reward_zero_std``, and the
paired per-task figure: each train task's rollout NDCG@10 at its first and its last visit
(``first_and_last_visits``; step means mix easy and hard tasks, this pairs the same task).
Writes ``grpo_signal.json`` to ``--out`` (default ``<root>/grpo_signal``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.stages.rl import HEALTH_IN_PROGRESS, rl_tasks
from recthinker_dagster.training.rl_recipes import load_rl_recipe

COLUMNS = ("step", "reward", "reward_std", "frac_reward_zero_std", "rewards/ranking/mean", "tools/call_frequency",
           "rollout/valid_rate", "rollout/answered_rate", "completions/mean_length", "completions/clipped_ratio",
           "rollout/sampler_logprob_abs_gap", "grad_norm", "time/rollout_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sft-adapter", type=Path, default=None, help="default: none, GRPO from the base model")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--answer-mode", default="generate", choices=["generate", "logits"])
    parser.add_argument("--prompt-history-len", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from recthinker_dagster.training.callbacks import LogProgress
    from recthinker_dagster.training.grpo import train_grpo

    overrides = {}
    for item in args.set:
        field_name, _, value = item.partition("=")
        overrides[field_name] = yaml.safe_load(value)
    recipe = load_rl_recipe(args.recipe).with_overrides(**overrides)
    layout = ArtifactLayout(args.root.resolve())
    tasks, toolboxes = rl_tasks(layout, args.datasets, recipe.n_train_tasks, args.prompt_history_len)
    out = args.out or layout.root / "grpo_signal"
    print(f"GRPO {recipe.name} ({recipe.digest}) on {len(tasks)} train tasks, {recipe.num_generations} rollouts "
          f"each, {recipe.max_steps} steps; overrides {overrides}", flush=True)
    result = train_grpo(tasks, toolboxes, layout.asset_dir("base_model"),
                        [args.sft_adapter] if args.sft_adapter else [], out / "run", recipe,
                        answer_mode=args.answer_mode,
                        callbacks=[LogProgress(lambda line: print(line, flush=True), "reward", HEALTH_IN_PROGRESS)])
    steps = result.metrics["steps"]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in steps:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in COLUMNS)
              + " |")
    summary = {**result.metrics["learning"],
               "seconds_per_step": result.metrics["seconds_per_step"],
               "time_split_per_step": result.metrics["time_split_per_step"],
               "recipe": recipe.to_dict(), "answer_mode": args.answer_mode, "n_tasks": len(tasks),
               "sft_adapter": str(args.sft_adapter or ""),
               "task_visits": result.metrics["task_visits"], "steps": steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_signal.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("reward", "mean_frac_reward_zero_std", "tasks_first_and_last_visit",
                                             "seconds_per_step", "time_split_per_step")}, indent=2))


if __name__ == "__main__":
    main()
