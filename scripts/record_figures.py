"""Record the behaviour figures of the data side of the pipeline, to compare two versions of the code.

    .venv/bin/python -m scripts.record_figures OUT_DIR --datasets synthetic      # from the repository root
    .venv/bin/python -m scripts.record_figures OUT_DIR --datasets ml-1m amazon-cds --data-dir DIR
    .venv/bin/python -m scripts.record_figures --compare BEFORE/figures.json AFTER/figures.json

Runs the real Dagster assets of the ``smoke`` profile (``pipeline_smoke``'s run config) from raw
files through the teacher trajectories, plus the evaluation of the classical systems and the
teacher, in a throwaway project under ``OUT_DIR``, and writes ``OUT_DIR/figures.json``: row
counts, task counts per split and group, trajectory count and valid-answer rate, NDCG@1/5/10 per
system and group, and the DVC md5 of every artifact. ``cf_model`` and ``teacher_trajectories``
hold wall-clock fields (training seconds, latency), so their folder md5 differs from run to run;
``content_md5_*`` hash them without those fields. ``--compare`` prints every difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.artifacts import key_prefix, read_dvc_md5
from recthinker_dagster.definitions import build_definitions
from recthinker_dagster.defs.config import EvaluationConfig, IngestConfig, TeacherConfig, ToolIndexesConfig
from recthinker_dagster.defs.jobs import profile_run_config
from tests.support.project import make_project

SYSTEMS = ["random", "popularity", "itemknn", "bprmf", "sasrec", "teacher"]
ASSETS = ("raw_dataset", "interactions", "items", "users", "task_splits", "item_catalog", "user_profiles", "cf_model",
          "item_relations", "similar_users", "tool_suite", "teacher_trajectories", "evaluation")
VERSIONED = ASSETS[1:-1]
RAW_FILES = {"ml-1m": ("ml-1m", ["ratings.dat.gz", "movies.dat.gz", "users.dat.gz"]),
             "amazon-cds": ("amazon-cds/recbole", ["Amazon_CDs.inter.gz", "Amazon_CDs.item.gz"])}


def run_config(datasets: list[str]) -> dg.RunConfig:
    """pipeline_smoke's config for the selected ops; synthetic data gets the smoke test's small overrides."""
    ops = profile_run_config("smoke", datasets).ops
    selected = {}
    for dataset in datasets:
        prefix = key_prefix(dataset)
        for op in ("raw_dataset", "ingest", "task_splits", "tool_indexes", "teacher_trajectories"):
            selected[f"{prefix}__{op}"] = ops[f"{prefix}__{op}"]
        selected[f"{prefix}__evaluation"] = EvaluationConfig(profile="smoke", systems=SYSTEMS)
        if dataset == "synthetic":
            selected[f"{prefix}__raw_dataset"] = IngestConfig(profile="smoke", allow_download=False)
            selected[f"{prefix}__ingest"] = IngestConfig(profile="smoke", allow_download=False)
            selected[f"{prefix}__tool_indexes"] = ToolIndexesConfig(profile="smoke", bpr_epochs=2,
                                                                           sasrec_train_windows=500)
            selected[f"{prefix}__teacher_trajectories"] = TeacherConfig(profile="smoke", samples_per_task=2)
            selected[f"{prefix}__evaluation"] = EvaluationConfig(profile="smoke", systems=SYSTEMS, n_bootstrap=100)
    return dg.RunConfig(ops=selected)


def materialize(out: Path, datasets: list[str], data_dir: Path | None) -> Path:
    project = make_project(out / "project")
    for dataset in datasets:
        if dataset in RAW_FILES:
            folder, names = RAW_FILES[dataset]
            (project.root / "data" / dataset).mkdir(parents=True, exist_ok=True)
            for name in names:
                shutil.copy(Path(data_dir or ".") / folder / name, project.root / "data" / dataset)
    job = build_definitions(datasets, resources=project.resources).resolve_implicit_global_asset_job_def()
    keys = [dg.AssetKey([key_prefix(d), a]) for d in datasets for a in ASSETS]
    result = job.execute_in_process(run_config=run_config(datasets), instance=dg.DagsterInstance.ephemeral(),
                                    asset_selection=keys)
    if not result.success:
        raise SystemExit("the run failed; see the log above")
    return project.root / "assets"


def figures(assets: Path, dataset: str) -> dict:
    tasks = assets / "task_splits" / dataset
    summary = json.loads((assets / "teacher_trajectories" / dataset / "summary.json").read_text())
    scores = pl.read_parquet(assets / "evaluation" / dataset / "summary.parquet").filter(pl.col("tasks") == "all")
    cf_meta = json.loads((assets / "cf_model" / dataset / "bprmf.json").read_text())
    cf_meta.pop("train_seconds", None)
    trajectories = [json.loads(line) for line in
                    (assets / "teacher_trajectories" / dataset / "trajectories.jsonl").read_text().splitlines()]
    for record in trajectories:
        record.pop("latency_s", None)
    return {
        **{f"rows_{t}": pl.read_parquet(assets / t / dataset / f"{t}.parquet").height
           for t in ("interactions", "items", "users")},
        **{f"tasks_{s}": dict(pl.read_parquet(tasks / f"tasks_{s}.parquet").group_by("group").len().sort("group").iter_rows())
           for s in ("train", "valid", "eval")},
        "train_interactions": pl.read_parquet(tasks / "train_interactions.parquet").height,
        "trajectories": summary["n_records"],
        "valid_rate": summary["valid_rate"],
        "ndcg": {f"{r['system']}/{r['group']}": [round(r[m], 6) for m in ("ndcg@1", "ndcg@5", "ndcg@10")]
                 for r in scores.iter_rows(named=True)},
        "md5": {asset: read_dvc_md5(assets / asset / f"{dataset}.dvc") for asset in VERSIONED},
        "content_md5_cf_model": hashlib.md5((assets / "cf_model" / dataset / "bprmf.npz").read_bytes()
                                            + json.dumps(cf_meta, sort_keys=True).encode()).hexdigest(),
        "content_md5_trajectories": hashlib.md5("\n".join(json.dumps(r, sort_keys=True) for r in trajectories)
                                                .encode()).hexdigest(),
    }


def differences(before, after, path: str = "") -> list[str]:
    if isinstance(before, dict) or isinstance(after, dict):
        before, after = before or {}, after or {}
        return [d for key in sorted(set(before) | set(after))
                for d in differences(before.get(key), after.get(key), f"{path}/{key}")]
    return [] if before == after else [f"{path}: {before} -> {after}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="empty folder for the throwaway project and figures.json")
    parser.add_argument("--datasets", nargs="+", default=["synthetic"])
    parser.add_argument("--data-dir", type=Path, help="folder with ml-1m/ and amazon-cds/recbole/ raw files")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        found = differences(*(json.loads(p.read_text()) for p in args.compare))
        print("\n".join(found) or "identical")
        return
    if args.out is None:
        parser.error("give OUT_DIR, or --compare BEFORE AFTER")
    assets = materialize(args.out, args.datasets, args.data_dir)
    result = {dataset: figures(assets, dataset) for dataset in args.datasets}
    (args.out / "figures.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
