"""Filter teacher trajectories, fine-tune the agent with a LoRA adapter (SFT), validate it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/train_sft.py --recipe demo \\
        --datasets ml-1m amazon-cds --output-dir runs/sft_demo

The same steps as the ``filtered_trajectories`` and ``sft_model`` assets, outside Dagster, on
the artifacts under ``--assets-dir`` (the pipeline's layout): (1) the recipe
(``recipes/sft_<name>.yaml`` or a path; ``--set key=value`` overrides fields), (2) each
dataset's ``teacher_trajectories`` filtered with the recipe's ``filter`` section, guarded
against that dataset's eval users and targets, (3) training (rerunning the same command resumes
from the last checkpoint; ``--no-resume`` starts over), (4) the validation slice of every
dataset (``eval`` section of the recipe) with the base model and with the adapter.

Outputs in ``--output-dir``: ``filter_counts.json``, ``filter_decisions.jsonl``,
``sft_data.jsonl``, ``checkpoints/``, ``adapter/``, ``metrics.json`` and ``validation.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
import yaml

from recthinker_dagster.agent import Trajectory
from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.defs.tools import INDEX_ASSETS  # the asset folder of each index
from recthinker_dagster.profiles import get_profile
from recthinker_dagster.tools import ToolIndexes
from recthinker_dagster.training import filter_trajectories, load_recipe, train_sft
from recthinker_dagster.training.validation import (
    ValidationSuite,
    evaluate_policy,
    validation_slice,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="smoke", help="recipe name (smoke, demo, full) or a .yaml/.json path")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--assets-dir", type=Path, default=REPO_ROOT / "assets")
    parser.add_argument("--base-model", type=Path, help="base model folder (default: the recipe's, else assets/base_model)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-validation", action="store_true", help="skip the before/after validation")
    parser.add_argument("--profile", default="demo", help="the profile whose prompt history length to use")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (YAML values)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    recipe = load_recipe(args.recipe).with_overrides(**{k: yaml.safe_load(v) for k, v in overrides.items()})
    base_model = args.base_model or Path(recipe.base_model or args.assets_dir / "base_model")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"recipe {recipe.name} v{recipe.version} ({recipe.digest})")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    kept, decisions, counts = [], [], {}
    for dataset in args.datasets:
        path = args.assets_dir / "teacher_trajectories" / dataset / "trajectories.jsonl"
        trajectories = [Trajectory.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        eval_tasks = pl.read_parquet(args.assets_dir / "task_splits" / dataset / "tasks_eval.parquet")
        result = filter_trajectories(
            trajectories, recipe.filter_config, tokenizer=tokenizer,
            eval_users=eval_tasks["user_id"].cast(pl.Utf8).to_list(),
            eval_targets=set(eval_tasks.select(pl.col("user_id", "target_item_id").cast(pl.Utf8)).iter_rows()),
        )
        kept.extend(result.kept)
        decisions.extend(row | {"dataset": dataset} for row in result.records())
        counts[dataset] = result.counts
        print(f"{dataset}: kept {result.counts['kept']} of {result.counts['total']}; "
              f"dropped by reason {result.counts['by_primary_reason']}")
    (args.output_dir / "filter_counts.json").write_text(json.dumps(counts, indent=2))
    with open(args.output_dir / "filter_decisions.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in decisions)
    with open(args.output_dir / "sft_data.jsonl", "w", encoding="utf-8") as out:
        out.writelines(t.to_json() + "\n" for t in kept)

    result = train_sft(kept, base_model, args.output_dir, recipe, resume=not args.no_resume)
    m = result.metrics
    print(f"trained to step {result.global_step} (resumed from {result.resumed_from}) in {m['train_seconds']} s; "
          f"final loss {m['final_loss']}; {m['seconds_per_step']} s/step, {m['tokens_per_second']} tokens/s")

    if not args.no_validation:
        settings = {"n_tasks": 8, "max_turns": 6, "max_tool_calls": 8, "max_new_tokens": 256, "batch_size": 8,
                    **recipe.eval}
        profile = get_profile(args.profile)
        suites = []
        for dataset in args.datasets:
            frame = validation_slice(pl.read_parquet(args.assets_dir / "task_splits" / dataset / "tasks_valid.parquet"),
                                     settings["n_tasks"])
            indexes = ToolIndexes.load({n: args.assets_dir / a / dataset for n, a in INDEX_ASSETS.items()})
            suites.append(ValidationSuite(dataset, agent_tasks(frame, indexes, profile.prompt_history_len),
                                          TaskToolboxes(indexes, frame)))
        agent = AgentConfig(max_turns=settings["max_turns"], max_tool_calls=settings["max_tool_calls"],
                            sampling=SamplingParams(max_new_tokens=settings["max_new_tokens"]))
        validation = {name: evaluate_policy(base_model, adapters, suites, agent, batch_size=settings["batch_size"],
                                            progress=print)
                      for name, adapters in (("base_model", None), ("sft_model", [result.adapter_dir]))}
        (args.output_dir / "validation.json").write_text(json.dumps({"settings": settings, **validation}, indent=2))
        for name, report in validation.items():
            print(name, json.dumps(report["overall"]))


if __name__ == "__main__":
    main()
