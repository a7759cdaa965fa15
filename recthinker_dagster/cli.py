"""Command line helpers around the pipeline's versioned artifacts.

    recthinker versions interactions/ml-1m      # every logged version (MLflow) of an artifact
    recthinker restore interactions/ml-1m MD5   # bring an earlier version back from DVC
"""

from __future__ import annotations

import argparse
import sys

from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths


def _artifact_folder(paths: ProjectPaths, artifact: str):
    asset, _, dataset = artifact.partition("/")
    folder = paths.asset_dir(asset, dataset or None)
    if not folder.parent.is_dir():
        raise SystemExit(f"unknown artifact {artifact!r}: {folder.parent} does not exist")
    return folder


def _asset_tag(artifact: str) -> str:
    asset, _, dataset = artifact.partition("/")
    return f"{dataset.replace('-', '_')}/{asset}" if dataset else asset


def cmd_versions(args: argparse.Namespace) -> int:
    import mlflow

    tracking = MLflowTracking()
    mlflow.set_tracking_uri(tracking.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=[tracking.experiment_name],
        filter_string=f"tags.asset = '{_asset_tag(args.artifact)}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    if not runs:
        print(f"no logged versions of {args.artifact}")
        return 1
    for run in runs:
        tags = run.data.tags
        print(f"{tags.get('dvc_md5', '-'):40s} dagster run {tags.get('dagster_run_id', '-')}  mlflow run {run.info.run_id}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    paths = ProjectPaths()
    folder = _artifact_folder(paths, args.artifact)
    DVCVersioning().restore(folder, args.md5)
    print(f"restored {folder.relative_to(paths.root_path)} to {args.md5}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recthinker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    versions = sub.add_parser("versions", help="list logged versions of an artifact")
    versions.add_argument("artifact", help="<asset>/<dataset>, e.g. interactions/ml-1m, or base_model")
    versions.set_defaults(func=cmd_versions)
    restore = sub.add_parser("restore", help="restore an earlier version of an artifact from DVC")
    restore.add_argument("artifact")
    restore.add_argument("md5", help="the DVC md5 (ends in .dir for folders)")
    restore.set_defaults(func=cmd_restore)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
