"""Filter the teacher trajectories and fine-tune the agent (SFT) outside Dagster.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/train_sft.py --profile demo --datasets ml-1m amazon-cds
    .venv/bin/python scripts/train_sft.py --profile smoke --set sft.max_steps=1 --set sft.validation.n_tasks=2

The same stages as the ``filtered_trajectories`` and ``sft_model`` assets (``stages.filtering``,
``stages.sft``) with the profile's settings (``profiles/<name>.yaml``; ``--set`` overrides one,
as in ``recthinker config``), on the artifacts under ``--root``: writes
``assets/filtered_trajectories`` (unless ``--skip-filtering``) and ``assets/sft_model``, without
DVC or MLflow. A rerun resumes an interrupted training run from its last checkpoint
(``--set sft.resume=false`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.cli import add_profile_arguments, profile_from_args
from recthinker_dagster.stages.filtering import build_filtered_trajectories_stage, check_sft_examples
from recthinker_dagster.stages.sft import build_sft_model_stage
from recthinker_dagster.stages.validation import validation_table

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_profile_arguments(parser, "filtering.min_examples=2")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="project root holding assets/ (default: this repo)")
    parser.add_argument("--skip-filtering", action="store_true", help="train on the published filtered_trajectories")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    profile = profile_from_args(args)
    layout = ArtifactLayout(args.root.resolve())
    if not args.skip_filtering:
        filtered = build_filtered_trajectories_stage(profile.filtering, layout, args.datasets)
        print(f"kept {filtered.totals['kept']} of {filtered.totals['total']} trajectories")
    report = check_sft_examples(layout, args.datasets)  # the pipeline's blocking check
    if not report.success:
        raise SystemExit("the SFT set fails its quality check:\n" + "\n".join(f"- {f}" for f in report.failures))
    result = build_sft_model_stage(profile.sft, layout, args.datasets)
    for path in result.artifact.cleanup:  # the finished run's checkpoints
        shutil.rmtree(path, ignore_errors=True)
    print(f"adapter in {layout.relative(result.artifact.folder / 'adapter')}")
    print(validation_table(result.validation))


if __name__ == "__main__":
    main()
