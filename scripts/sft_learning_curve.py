"""The SFT learning curve: how much the agent learns from 0, 32, 64, ... teacher trajectories.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/sft_learning_curve.py --profile demo \\
        --root DIR [--data-dir DIR] [--datasets ml-1m amazon-cds] [--sizes 0 32 64 128 256 all] \\
        [--set SECTION.FIELD=VALUE] [--out DIR]

Builds what is missing under ``--root`` with the pipeline's own stages and the profile's settings
(tables, task splits, tool indexes, the base model, the teacher trajectories, the filtered set),
then runs ``stages.sft_curve.sft_learning_curve``: one adapter per size, trained on the first
``n`` kept trajectories of a seeded shuffle with the profile's SFT recipe, each scored on the
profile's SFT validation slice (valid tasks, never eval). Prints a Markdown table and writes
``learning_curve.json`` and ``learning_curve.png`` to ``--out`` (default ``<root>/learning_curve``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.stages.base_model import build_base_model_stage
from recthinker_dagster.stages.filtering import build_filtered_trajectories_stage
from recthinker_dagster.stages.inputs import ensure_tool_inputs
from recthinker_dagster.stages.sft_curve import sft_learning_curve
from recthinker_dagster.stages.trajectories import build_teacher_trajectories_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_profile_arguments(parser, "sft.validation.n_tasks=50")
    add_raw_data_argument(parser)
    parser.add_argument("--root", type=Path, required=True, help="project root for the artifacts")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--sizes", nargs="+", default=["0", "32", "64", "128", "256", "all"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    profile = profile_from_args(args)
    layout = ArtifactLayout(args.root.resolve(), data_dir=args.data_dir)
    for dataset in args.datasets:
        ensure_tool_inputs(profile, layout, dataset, log=print)
    if not layout.asset_dir("base_model").is_dir():
        build_base_model_stage(profile.base_model, layout)
    for dataset in args.datasets:
        if not layout.asset_dir("teacher_trajectories", dataset).is_dir():
            build_teacher_trajectories_stage(profile.teacher, layout, dataset)
    if not layout.asset_dir("filtered_trajectories").is_dir():
        build_filtered_trajectories_stage(profile.filtering, layout, args.datasets)
    sizes = [size if size == "all" else int(size) for size in args.sizes]
    curve = sft_learning_curve(profile.sft, layout, args.datasets, sizes)
    paths = curve.write(args.out or layout.root / "learning_curve")
    print(curve.markdown())
    print(f"wrote {paths['json']} and {paths['png']}")


if __name__ == "__main__":
    main()
