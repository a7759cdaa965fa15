"""Filter teacher trajectories, then fine-tune the agent with a LoRA adapter (SFT).

    .venv/bin/python scripts/train_sft.py --recipe smoke \\
        --trajectories assets/teacher_trajectories/ml-1m/trajectories.jsonl \\
        --base-model assets/base_model --output-dir runs/sft/ml-1m-smoke \\
        --eval-tasks assets/task_splits/ml-1m/tasks_eval.parquet

Sections: (1) load the recipe (``recipes/sft_<name>.yaml`` or a path; ``--set key=value``
overrides single fields), (2) read the trajectories (``Trajectory.to_json`` lines; several files
allowed), (3) filter them with the recipe's ``filter`` section, guarding against every user and
(user, target) of ``--eval-tasks`` (a task-table parquet), and write the decisions next to the
run, (4) train (rerunning the same command resumes from the last checkpoint; ``--no-resume``
starts over), (5) optionally evaluate the adapter on ``--valid-tasks`` with the tool indexes
under ``--assets-dir`` (the pipeline's asset layout) and the recipe's ``eval`` section.

Outputs in ``--output-dir``: ``filter_counts.json``, ``filter_decisions.jsonl``,
``sft_data.jsonl`` (the kept trajectories), ``checkpoints/``, ``adapter/``, ``metrics.json``
and, with ``--valid-tasks``, ``eval.json``. Prefix the command with
``OMP_WAIT_POLICY=PASSIVE`` on machines whose cores other processes compete for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from recthinker_dagster.agent import Trajectory
from recthinker_dagster.training import filter_trajectories, load_recipe, train_sft

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="smoke", help="recipe name (smoke, demo, full) or a .yaml/.json path")
    parser.add_argument("--trajectories", nargs="+", type=Path, required=True, help=".jsonl files of trajectories")
    parser.add_argument("--base-model", type=Path, help="base model folder (default: the recipe's, else assets/base_model)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--eval-tasks", type=Path, help="task-table parquet whose users must never be trained on")
    parser.add_argument("--no-filter", action="store_true", help="the trajectories are already filtered")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (YAML values)")
    parser.add_argument("--valid-tasks", type=Path, help="task-table parquet to evaluate the adapter on")
    parser.add_argument("--assets-dir", type=Path, default=REPO_ROOT / "assets", help="for the tool indexes")
    parser.add_argument("--dataset", default="ml-1m", help="the tool indexes' dataset partition")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    # (1) recipe
    overrides = dict(item.split("=", 1) for item in args.set)
    recipe = load_recipe(args.recipe).with_overrides(**{k: yaml.safe_load(v) for k, v in overrides.items()})
    base_model = args.base_model or Path(recipe.base_model or REPO_ROOT / "assets" / "base_model")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    # (2) trajectories
    trajectories = [Trajectory.from_json(line) for path in args.trajectories
                    for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"{len(trajectories)} trajectories from {len(args.trajectories)} file(s); recipe {recipe.name} "
          f"v{recipe.version} ({recipe.digest})")

    # (3) filter, with the eval-leak guard
    if args.no_filter:
        kept = trajectories
    else:
        eval_users, eval_targets = set(), set()
        if args.eval_tasks:
            import polars as pl

            tasks = pl.read_parquet(args.eval_tasks, columns=["user_id", "target_item_id"])
            eval_users = set(tasks["user_id"].to_list())
            eval_targets = set(tasks.iter_rows())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
        result = filter_trajectories(trajectories, recipe.filter_config, tokenizer=tokenizer,
                                     eval_users=eval_users, eval_targets=eval_targets)
        kept = result.kept
        (args.output_dir / "filter_counts.json").write_text(json.dumps(result.counts, indent=2))
        with open(args.output_dir / "filter_decisions.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in result.records())
        print(f"filter: kept {len(kept)} of {len(trajectories)}; dropped by reason {result.counts['by_primary_reason']}")
    with open(args.output_dir / "sft_data.jsonl", "w", encoding="utf-8") as out:
        out.writelines(t.to_json() + "\n" for t in kept)

    # (4) train (resumes from output_dir/checkpoints)
    result = train_sft(kept, base_model, args.output_dir, recipe, resume=not args.no_resume)
    m = result.metrics
    print(f"trained to step {result.global_step} (resumed from {result.resumed_from}); final loss "
          f"{m['final_loss']}; {m['seconds_per_step']} s/step, {m['tokens_per_second']} tokens/s; "
          f"adapter in {result.adapter_dir}")

    # (5) evaluate on validation tasks
    if args.valid_tasks:
        scores = evaluate(args, recipe, base_model, result.adapter_dir)
        (args.output_dir / "eval.json").write_text(json.dumps(scores, indent=2))
        print("eval:", json.dumps(scores))


def evaluate(args, recipe, base_model: Path, adapter_dir: Path) -> dict:
    import polars as pl

    from recthinker_dagster.agent import AgentConfig, AgentTask, SamplingParams
    from recthinker_dagster.defs.tools import (
        INDEX_ASSETS,  # the asset folder of each index
    )
    from recthinker_dagster.tools import Toolbox, ToolIndexes
    from recthinker_dagster.training import evaluate_adapter

    settings = {"n_tasks": 8, "max_turns": 6, "max_tool_calls": 8, "max_new_tokens": 256, "batch_size": 8,
                **recipe.eval}
    indexes = ToolIndexes.load({name: args.assets_dir / asset / args.dataset for name, asset in INDEX_ASSETS.items()})
    rows = pl.read_parquet(args.valid_tasks).head(settings["n_tasks"]).rows(named=True)
    by_id = {row["task_id"]: row for row in rows}
    tasks = [AgentTask.from_mapping(row, [indexes.catalog.line(i) for i in row["history_item_ids"][-10:]])
             for row in rows]
    config = AgentConfig(max_turns=settings["max_turns"], max_tool_calls=settings["max_tool_calls"],
                         sampling=SamplingParams(max_new_tokens=settings["max_new_tokens"]))
    return evaluate_adapter(base_model, adapter_dir, tasks, lambda task: Toolbox(indexes, by_id[task.task_id]),
                            config, batch_size=settings["batch_size"])


if __name__ == "__main__":
    main()
