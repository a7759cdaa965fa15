"""Scale-out figures on this machine: the per-dataset branches in series and in parallel, and
data-parallel SFT steps against one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_scale_out.py [--profile smoke]
        [--data-dir data] [--out DIR] [--sft-root ROOT] [--sft-examples 16] [--sft-steps 4]

1. ``data_<profile>`` (every dataset's ingestion, quality gates, task splits, tool indexes and
   teacher trajectories, plus the base model) materialized from nothing in two fresh projects:
   with the in-process executor (one step at a time) and with the multiprocess executor
   (independent steps side by side). Prints both wall times and the slowest steps.
2. With ``--sft-root`` (a project root that holds ``filtered_trajectories`` and ``base_model``):
   the same SFT steps on the first ``--sft-examples`` kept trajectories, in one process and in
   two (``accelerate launch``), with the global batch of the profile's recipe. Prints seconds per
   step and the per-step losses of both.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r'Finished execution of step "([^"]+)" in ([0-9.]+)(ms|s|m[0-9.]*s?)')


def seconds(amount: str, unit: str) -> float:
    if unit == "ms":
        return float(amount) / 1000
    if unit == "s":
        return float(amount)
    minutes_seconds = re.fullmatch(r"m([0-9.]*)s?", unit)
    return float(amount) * 60 + float(minutes_seconds.group(1) or 0) if minutes_seconds else float("nan")


def fresh_project(root: Path) -> None:
    from dvc.repo import Repo

    root.mkdir(parents=True)
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo, repo.config.edit() as conf:
        conf["remote"]["local"] = {"url": str(root / "dvc_remote")}
        conf["core"]["remote"] = "local"
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def materialize_branches(executor: str, profile: str, data_dir: Path, root: Path) -> tuple[float, list]:
    fresh_project(root)
    env = {**os.environ, "RECTHINKER_HOME": str(root), "RECTHINKER_DATA_DIR": str(data_dir),
           "RECTHINKER_CACHE_DIR": str(REPO / ".cache"), "DAGSTER_HOME": str(root / "dagster_home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", "RECTHINKER_EXECUTOR": executor,
           "OMP_WAIT_POLICY": "PASSIVE"}
    command = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "recthinker_dagster.definitions",
               "-j", f"data_{profile}"]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = run.stdout + run.stderr
    if run.returncode != 0:
        raise SystemExit(f"data_{profile} with the {executor} executor failed:\n{output[-3000:]}")
    steps = sorted(((name, seconds(amount, unit)) for name, amount, unit in STEP_LINE.findall(output)),
                   key=lambda item: -item[1])
    return wall, steps


def benchmark_branches(profile: str, data_dir: Path, out: Path) -> None:
    print(f"## data_{profile}: the per-dataset branches from nothing ({os.cpu_count()} cores)\n", flush=True)
    walls = {}
    for executor in ("in_process", "multiprocess"):
        walls[executor], steps = materialize_branches(executor, profile, data_dir, out / executor)
        slowest = ", ".join(f"{name} {value:.1f}s" for name, value in steps[:4])
        print(f"- {executor}: {walls[executor]:.1f} s wall; slowest steps: {slowest}", flush=True)
    print(f"- multiprocess / in_process: {walls['multiprocess'] / walls['in_process']:.2f}x the wall time\n")


def benchmark_training(sft_root: Path, profile: str, n_examples: int, n_steps: int, out: Path) -> None:
    from recthinker_dagster.artifacts import ArtifactLayout, read_kept_trajectories
    from recthinker_dagster.settings import load_profile
    from recthinker_dagster.training.distributed import launch_sft
    from recthinker_dagster.training.recipes import load_recipe
    from recthinker_dagster.training.sft import train_sft

    layout = ArtifactLayout(sft_root)
    records = read_kept_trajectories(layout)[:n_examples]
    recipe = load_recipe(load_profile(profile).sft.recipe).with_overrides(max_steps=n_steps, save_steps=10 * n_steps,
                                                                         warmup_steps=0)
    if recipe.gradient_accumulation_steps % 2:
        recipe = recipe.with_overrides(gradient_accumulation_steps=2 * recipe.gradient_accumulation_steps)
    base = layout.asset_dir("base_model")
    global_batch = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    print(f"## SFT: {n_steps} steps of recipe {recipe.name} (global batch {global_batch}) on {len(records)} "
          "kept trajectories\n", flush=True)
    one = train_sft(records, base, out / "one", recipe, resume=False)
    two = launch_sft(records, base, out / "two", recipe.with_overrides(num_processes=2), resume=False,
                     log=lambda line: None)
    for name, run in (("1 process", one), ("2 processes", two)):
        losses = ", ".join(f"{step['loss']:.4f}" for step in run.metrics["steps"])
        print(f"- {name}: {run.metrics['seconds_per_step']:.1f} s/step, losses {losses}", flush=True)
    print(f"- 2 processes / 1 process: {two.metrics['seconds_per_step'] / one.metrics['seconds_per_step']:.2f}x "
          "the step time\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--sft-root", type=Path, default=None)
    parser.add_argument("--sft-examples", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--skip-branches", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="recthinker-scale-out-"))
    try:
        if not args.skip_branches:
            benchmark_branches(args.profile, args.data_dir.resolve(), out / "branches")
        if args.sft_root:
            benchmark_training(args.sft_root.resolve(), args.profile, args.sft_examples, args.sft_steps, out / "sft")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
