"""Did a GRPO run improve its policy on its own tasks? Resample the start and the trained policy.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/resample_policies.py --root DIR --run RUN \\
        [--steps 100 101 102 103] [--json-out FILE]
    .venv/bin/python scripts/resample_policies.py --merge FILE FILE [...] [--json-out FILE]

``RUN`` is the ``--out`` folder of ``scripts/grpo_signal.py`` (its ``grpo_signal.json`` names
the recipe with every override, the answer mode, the start adapter and the tasks trained on;
``RUN/run/adapter`` is the trained adapter) or a published ``rl_model`` asset folder such as
``DIR/assets/rl_model`` (the same from its ``metrics.json``, ``lineage.json`` and
``validation.json``). Both policies are sampled on those tasks as GRPO samples a group
(``training/resampling.py``), at the step seeds ``--steps`` (pick steps the run never reached:
its own draws are in its curve), and compared group by group. Prints
each policy's mean reward (with its standard error over the groups), rollout NDCG@10, own
answers, failed and made tool calls per rollout, then the trained minus the start policy's
reward with a 95% bootstrap interval. A run whose reward curve rose because its first steps
drew badly shows no difference here.

``--merge`` pools the ``--json-out`` files of several resamplings of one run at different step
seeds (for example, two sessions' worth) into one comparison, without sampling again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--run", type=Path, help="a scripts/grpo_signal.py --out folder or a published rl_model folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 101, 102, 103],
                        help="step seeds to sample at (default: 4 steps no demo run reaches)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                        help="pool earlier --json-out files of one run instead of sampling")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json_out)
        return
    if args.root is None or args.run is None:
        parser.error("--root and --run are required unless --merge is given")

    import torch

    from recthinker_dagster.artifacts import ArtifactLayout
    from recthinker_dagster.stages.rl import run_rollouts
    from recthinker_dagster.training.grpo import load_policy_start
    from recthinker_dagster.training.resampling import compare_resampled, read_grpo_run, resampled_groups

    layout = ArtifactLayout(args.root.resolve())
    try:
        run = read_grpo_run(args.run, layout.root)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    rollouts = run_rollouts(layout, run)
    torch.manual_seed(rollouts.recipe.seed)
    groups = {}
    for name, adapters in (("start", run.start_adapters), ("trained", [*run.start_adapters, run.trained_adapter])):
        model = load_policy_start(layout.asset_dir("base_model"), adapters, rollouts.precision)
        model.eval()
        groups[name] = resampled_groups(model, rollouts.rollout(), rollouts.recipe, args.steps)
        print(f"{name}: {len(groups[name])} groups sampled", flush=True)
        del model
    comparison = compare_resampled(groups["start"], groups["trained"])
    print(json.dumps(comparison, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps({"run": str(args.run), "steps": args.steps, "tasks": run.task_ids,
                                             **comparison, "groups": groups}, indent=2))


def merge(files: list[Path], json_out: Path | None) -> None:
    from recthinker_dagster.training.resampling import merge_resamplings

    documents = []
    for path in files:
        try:
            documents.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: cannot read a resampling ({error})") from None
    try:
        merged = merge_resamplings(documents)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    summary = {key: value for key, value in merged.items() if key not in ("tasks", "groups")}
    print(json.dumps(summary, indent=2))
    if json_out:
        json_out.write_text(json.dumps(merged, indent=2))


if __name__ == "__main__":
    main()
