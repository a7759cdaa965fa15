"""Does GRPO have signal? A GRPO run on an SFT adapter, with its health figures per step.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/grpo_signal.py --root DIR \\
        [--sft-adapter DIR/adapter] [--recipe demo] [--set FIELD=VALUE ...] [--datasets ml-1m amazon-cds] \\
        [--answer-mode generate] [--unsolved-from POOL | --task-ids ID ...] [--out DIR]

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
``--unsolved-from POOL`` screens the first ``POOL`` train tasks per dataset with the start policy
(greedy, the recipe's turn and token budgets) and trains on the first ``n_train_tasks`` per
dataset it did not solve (NDCG@10 below 1): a solved task's rollouts can only stay or fall.
A recipe with ``screen_pool`` (the demo's) picks its tasks by the stage's screening instead
(``training/task_screening.py``); ``--set screen_pool=0`` takes the first tasks. ``--task-ids``
trains on the named train tasks and skips the screening: two recipes compared on the tasks an
earlier run chose (its ``task_screening.chosen`` in ``metrics.json``) differ only by the recipe.
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
    parser.add_argument("--unsolved-from", type=int, default=0, metavar="POOL",
                        help="train on the start policy's unsolved tasks among the first POOL per dataset")
    parser.add_argument("--task-ids", nargs="+", default=None, metavar="ID",
                        help="train on these train tasks (dataset/train/N), without the screening")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.unsolved_from and args.task_ids:
        parser.error("--unsolved-from and --task-ids both choose the tasks: give one")

    from recthinker_dagster.training.callbacks import LogProgress
    from recthinker_dagster.training.grpo import train_grpo

    overrides = {}
    for item in args.set:
        field_name, _, value = item.partition("=")
        overrides[field_name] = yaml.safe_load(value)
    recipe = load_rl_recipe(args.recipe).with_overrides(**overrides)
    layout = ArtifactLayout(args.root.resolve())
    if args.task_ids:  # n_train_tasks 0: look the ids up among all of the pool's tasks
        tasks, toolboxes = rl_tasks(layout, args.datasets, 0, args.prompt_history_len, args.task_ids,
                                    task_pool=recipe.task_pool)
    elif args.unsolved_from:
        tasks, toolboxes = rl_tasks(layout, args.datasets, args.unsolved_from, args.prompt_history_len,
                                    task_pool=recipe.task_pool)
        tasks = unsolved_tasks(tasks, toolboxes, layout.asset_dir("base_model"), args.sft_adapter, recipe,
                               args.answer_mode)
    elif recipe.screen_pool:  # as the rl_model stage: the pool's tasks whose sampled rewards vary most
        from recthinker_dagster.training.task_screening import screen_tasks

        pool, toolboxes = rl_tasks(layout, args.datasets, recipe.screen_pool, args.prompt_history_len,
                                   task_pool=recipe.task_pool)
        tasks = screen_tasks(pool, toolboxes, layout.asset_dir("base_model"),
                             [args.sft_adapter] if args.sft_adapter else [], recipe, answer_mode=args.answer_mode).tasks
    else:
        tasks, toolboxes = rl_tasks(layout, args.datasets, recipe.n_train_tasks, args.prompt_history_len,
                                    task_pool=recipe.task_pool)
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
               "sft_adapter": str(args.sft_adapter or ""), "prompt_history_len": args.prompt_history_len,
               "task_visits": result.metrics["task_visits"], "steps": steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_signal.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("reward", "mean_frac_reward_zero_std", "tasks_first_and_last_visit",
                                             "seconds_per_step", "time_split_per_step")}, indent=2))


def unsolved_tasks(pool: list, toolboxes, base_model: Path, sft_adapter: Path | None, recipe,
                   answer_mode: str) -> list:
    """The first ``recipe.n_train_tasks`` tasks per dataset of ``pool`` whose greedy rollout by
    the start policy (the recipe's rollout settings) has NDCG@10 below 1, in pool order."""
    from recthinker_dagster.training.grpo import rollout_agent
    from recthinker_dagster.training.validation import ValidationSuite, evaluate_policy

    by_dataset: dict[str, list] = {}
    for task in pool:
        by_dataset.setdefault(task.dataset, []).append(task)
    config, toolbox_factory = rollout_agent(recipe, toolboxes, answer_mode)
    suites = [ValidationSuite(dataset, tasks, toolbox_factory) for dataset, tasks in by_dataset.items()]
    report = evaluate_policy(base_model, [sft_adapter] if sft_adapter else [], suites, config,
                             batch_size=recipe.rollout_batch_size)
    score = {row["task_id"]: row["ndcg@10"] for row in report["per_task"]}
    kept = []
    for dataset, tasks in by_dataset.items():
        unsolved = [t for t in tasks if score[t.task_id] < 1.0]
        print(f"{dataset}: start policy's greedy NDCG@10 on the pool {[round(score[t.task_id], 3) for t in tasks]}; "
              f"{len(unsolved)} unsolved, training on {len(unsolved[: recipe.n_train_tasks])}", flush=True)
        kept += unsolved[: recipe.n_train_tasks]
    if not kept:
        raise SystemExit("the start policy solves every task of the pool greedily: nothing to select")
    return kept


if __name__ == "__main__":
    main()
