"""Command line helpers around the pipeline's settings and versioned artifacts.

    recthinker config smoke                     # every resolved setting of a profile and its source
    recthinker config demo --set teacher.samples_per_task=4 --json
    recthinker versions interactions/ml-1m      # every logged version (MLflow) of an artifact
    recthinker restore interactions/ml-1m MD5   # bring an earlier version back from DVC
    recthinker report                           # rebuild every evaluation's results.md from its rankings
    recthinker report ml-1m --check             # ...and fail if it differs from the saved results.md
    recthinker merge merged/sft_rl assets/base_model assets/sft_model/adapter assets/rl_model/adapter
    recthinker materialize rl_model --profile demo   # chosen assets with a profile's config
    recthinker materialize ml_1m/evaluation --job headline_demo   # ... in a named job, with its config
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from recthinker_dagster.artifacts import asset_label
from recthinker_dagster.defs.resources import DVCVersioning, MLflowTracking, ProjectPaths
from recthinker_dagster.settings import PROFILE_NAMES, Profile, default_profile_name, load_profile


def artifact_folder(paths: ProjectPaths, artifact: str):
    """The folder of ``<asset>/<dataset>`` (or a shared ``<asset>``); an error if unknown."""
    asset, _, dataset = artifact.partition("/")
    folder = paths.asset_dir(asset, dataset or None)
    if not folder.parent.is_dir():
        raise SystemExit(f"unknown artifact {artifact!r}: {folder.parent} does not exist")
    return folder


def asset_tag(artifact: str) -> str:
    """The MLflow ``asset`` tag of ``<asset>/<dataset>``: ``interactions/ml-1m`` -> ``ml_1m/interactions``."""
    asset, _, dataset = artifact.partition("/")
    return asset_label(asset, dataset or None)


def add_profile_arguments(parser: argparse.ArgumentParser, example: str = "teacher.samples_per_task=4") -> None:
    """``--profile`` and repeatable ``--set section.field=value``, as ``recthinker config`` takes them."""
    parser.add_argument("--profile", default=default_profile_name(), help="profiles/<name>.yaml (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help=f"override one setting (repeatable), e.g. --set {example}")


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile named by :func:`add_profile_arguments`' options, with their overrides."""
    return load_profile(args.profile, parse_overrides(args.set))


def add_raw_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: the raw datasets for scripts that build the data side themselves
    (default ``$RECTHINKER_SHARED_DATA``, else ``shared/data`` next to the repository)."""
    default = os.environ.get("RECTHINKER_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data-dir", type=Path, default=Path(default), help="raw datasets folder (default: %(default)s)")


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["teacher.samples_per_task=4"]`` -> ``{"teacher.samples_per_task": 4}`` (values read as YAML,
    so ``0``, ``false``, ``null`` and ``[a, b]`` are typed; quote a string that looks like one)."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {assignment!r}: expected <section>.<field>=<value>")
        overrides[key.strip()] = parse_value(value)
    return overrides


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML; ``1e-5`` (a string to YAML 1.1) as a float, an empty value as ``""``."""
    if not text.strip():
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def settings_rows(profile: Profile) -> list[tuple[str, Any, str]]:
    """``(setting, value, source)`` for every resolved setting, in the profile's section order."""
    return [(key, value, profile.sources.get(key, "default")) for key, value in profile.flat().items()]


def format_settings_table(profile: Profile) -> str:
    """The resolved settings as an aligned, plain-text table under a title line (values last:
    a long list does not widen the other columns)."""
    rows = [(key, source, json.dumps(value)) for key, value, source in settings_rows(profile)]
    header = ("setting", "source", "value")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    rule = tuple("-" * width for width in widths)
    title = f"profile {profile.name}" + (f": {profile.description}" if profile.description else "")
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, rule, *rows]]
    return "\n".join([title, *lines])


def cmd_config(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile, parse_overrides(args.set or []))
    except ValueError as error:
        print(f"recthinker config: {error}", file=sys.stderr)
        return 2
    if args.json:
        settings = {key: {"value": value, "source": source} for key, value, source in settings_rows(profile)}
        print(json.dumps({"profile": profile.name, "description": profile.description, "settings": settings}, indent=2))
    else:
        print(format_settings_table(profile))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    import mlflow

    tracking = MLflowTracking()
    mlflow.set_tracking_uri(tracking.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=[tracking.experiment_name],
        filter_string=f"tags.asset = '{asset_tag(args.artifact)}'",
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
    folder = artifact_folder(paths, args.artifact)
    DVCVersioning().restore(folder, args.md5)
    print(f"restored {folder.relative_to(paths.root_path)} to {args.md5}")
    return 0


def evaluation_folders(paths: ProjectPaths, datasets: list[str]) -> list[Path]:
    """The evaluation folders of ``datasets`` (default: every one with saved rankings)."""
    root = paths.asset_dir("evaluation", "any").parent
    if datasets:
        return [root / dataset for dataset in datasets]
    folders = sorted(p.parent for p in root.glob("*/rankings.parquet"))
    if not folders:
        raise SystemExit(f"no evaluation under {root}: materialize the evaluation assets first")
    return folders


def cmd_report(args: argparse.Namespace) -> int:
    from recthinker_dagster.evaluation.results import rebuild_report

    paths = ProjectPaths(root=str(args.root)) if args.root else ProjectPaths()
    reports, differs = [], []
    folders = evaluation_folders(paths, args.datasets)
    for folder in folders:
        try:
            report = rebuild_report(folder)
        except (FileNotFoundError, ValueError) as error:
            print(f"recthinker report: {error}", file=sys.stderr)
            return 2
        saved = folder / "results.md"
        if args.check and (not saved.exists() or saved.read_text() != report):
            differs.append(str(saved))
        reports.append(report)
    text = "\n".join(reports)
    if args.out:  # a document (docs/results.md): say what produced it, and when
        import datetime

        from recthinker_dagster.artifacts import ArtifactLayout
        from recthinker_dagster.stages.evaluation import training_cost_markdown

        names = ", ".join(folder.name for folder in folders)
        produced = f"The rankings were produced by `{args.produced_by}`. " if args.produced_by else ""
        header = (f"{produced}Rebuilt on {datetime.date.today().isoformat()} by `recthinker report --out {args.out}` "
                  f"from the saved per-task rankings of: {names} (assets/evaluation/<dataset>/rankings.parquet).\n\n")
        cost = training_cost_markdown(ArtifactLayout(paths.root_path))
        Path(args.out).write_text(header + (cost + "\n" if cost else "") + text)
        print(f"wrote {args.out}")
    else:
        print(text)
    if differs:
        print(f"recthinker report: rebuilt from the rankings, these differ from the saved report: {differs}", file=sys.stderr)
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """The policy as one plain model folder: what a generation server (vLLM) serves."""
    from recthinker_dagster.models.loading import load_agent_model

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"recthinker merge: {args.out} exists and is not an empty folder; choose a new one", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_agent_model(args.base_model, args.adapters, dtype=args.dtype, device="cpu")
    except FileNotFoundError as error:
        print(f"recthinker merge: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    print(f"wrote {args.out}: {args.base_model} with {len(args.adapters)} adapter(s) merged in")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """Chosen assets in this process, with the profile's job config (defs/materialize.py says
    why not ``dagster asset materialize --select``)."""
    from recthinker_dagster.defs.materialize import UnknownAssets, materialize_assets

    profile = args.profile or default_profile_name()
    if profile not in PROFILE_NAMES:
        print(f"recthinker materialize: unknown profile {profile!r}; one of {list(PROFILE_NAMES)}", file=sys.stderr)
        return 2
    try:
        result = materialize_assets(args.assets, profile, args.job)
    except UnknownAssets as error:
        print(f"recthinker materialize: {error}", file=sys.stderr)
        return 2
    done = [event.asset_key.to_user_string() for event in result.get_asset_materialization_events()
            if event.asset_key is not None]
    print(f"run {result.run_id}: {'succeeded' if result.success else 'FAILED'}; materialized: {done or 'nothing'}")
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recthinker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="print every resolved setting of a profile and where it came from")
    config.add_argument(
        "profile", nargs="?", default=None,
        help=f"profile name (profiles/<name>.yaml), e.g. one of {list(PROFILE_NAMES)}; "
             f"default: $RECTHINKER_PROFILE or {default_profile_name()!r}",
    )
    config.add_argument(
        "--set", action="append", metavar="SECTION.FIELD=VALUE",
        help="override one setting (repeatable); the value is read as YAML, e.g. --set evaluation.llm_tasks=0",
    )
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.set_defaults(func=cmd_config)
    versions = sub.add_parser("versions", help="list logged versions of an artifact")
    versions.add_argument("artifact", help="<asset>/<dataset>, e.g. interactions/ml-1m, or base_model")
    versions.set_defaults(func=cmd_versions)
    restore = sub.add_parser("restore", help="restore an earlier version of an artifact from DVC")
    restore.add_argument("artifact")
    restore.add_argument("md5", help="the DVC md5 (ends in .dir for folders)")
    restore.set_defaults(func=cmd_restore)
    report = sub.add_parser("report", help="rebuild the evaluation tables from the saved per-task rankings alone")
    report.add_argument("datasets", nargs="*", help="datasets to report (default: every evaluated one)")
    report.add_argument("--root", type=Path, default=None, help="project root (default: this project)")
    report.add_argument("--check", action="store_true", help="exit 1 if a rebuilt report differs from its results.md")
    report.add_argument("--out", type=Path, default=None,
                        help="write a document to this file instead of printing: the reports, led by the training cost "
                             "of the trained systems")
    report.add_argument("--produced-by", default=None, metavar="COMMAND",
                        help="with --out: the command that produced the rankings, named in the document")
    report.set_defaults(func=cmd_report)
    merge = sub.add_parser("merge", help="write a policy (base model + adapters, merged) as one model folder, "
                                         "e.g. for vllm serve")
    merge.add_argument("out", type=Path, help="the new model folder")
    merge.add_argument("base_model", type=Path, help="the base model folder, e.g. assets/base_model")
    merge.add_argument("adapters", type=Path, nargs="*",
                       help="LoRA adapter folders in training order, e.g. assets/sft_model/adapter assets/rl_model/adapter")
    merge.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    merge.set_defaults(func=cmd_merge)
    materialize = sub.add_parser("materialize", help="materialize chosen assets with a profile's config "
                                                     "(upstream assets are read as published, not re-run)")
    materialize.add_argument("assets", nargs="+", help="asset keys, e.g. rl_model ml_1m/evaluation")
    materialize.add_argument("--profile", default=None,
                             help=f"one of {list(PROFILE_NAMES)} (default: $RECTHINKER_PROFILE or "
                                  f"{default_profile_name()!r})")
    materialize.add_argument("--job", default=None,
                             help="run them in this job, with its config, e.g. headline_demo (default: the "
                                  "profile's pipeline_ or think_ job that holds them)")
    materialize.set_defaults(func=cmd_materialize)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
