"""The SFT learning curve: train on growing prefixes of the kept trajectories, validate each.

    curve = sft_learning_curve(settings, layout, ["ml-1m", "amazon-cds"], sizes=[0, 32, 128, "all"])
    curve.points          # one row per size: own-answer rate, valid tool-call rate, calls, NDCG@1/5/10
    curve.write(folder)   # learning_curve.json and learning_curve.png

Each size ``n`` trains a fresh adapter from the base model on the first ``n`` trajectories of a
seeded shuffle of ``filtered_trajectories`` (so every prefix holds the smaller ones), for the
recipe's ``num_train_epochs`` (``max_steps`` = epochs x n / effective batch), and runs the same
validation slice as the ``sft_model`` asset (``stages/validation.py``). Size 0 is the base model.
Each run resumes from its checkpoints under ``.work/sft_curve/<recipe digest>/n<n>``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recthinker_dagster.artifacts import ArtifactLayout, read_kept_trajectories
from recthinker_dagster.evaluation.report import plot_learning_curve
from recthinker_dagster.settings import SFTSettings
from recthinker_dagster.stages.filtering import base_model_folder
from recthinker_dagster.stages.sft import sft_recipe
from recthinker_dagster.stages.validation import validation_agent, validation_suites
from recthinker_dagster.training.validation import evaluate_policy

CURVE_COLUMNS = ("answered_rate", "valid_tool_call_rate", "tool_calls_per_task", "ndcg@1", "ndcg@5", "ndcg@10")


@dataclass
class LearningCurve:
    points: list[dict]  # {"n", "steps", "train_seconds", "validate_seconds", "overall": {...}, "by_dataset": {...}}
    recipe: dict

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "learning_curve.json", "png": folder / "learning_curve.png"}
        paths["json"].write_text(json.dumps({"recipe": self.recipe, "points": self.points}, indent=2))
        plot_learning_curve(self.points, paths["png"])
        return paths

    def metrics(self) -> dict[str, float]:
        """``curve_n<n>_<column>`` for every size and column (MLflow metrics)."""
        return {f"curve_n{p['n']}_{c}": p["overall"][c] for p in self.points for c in CURVE_COLUMNS
                if c in p["overall"]}

    def markdown(self) -> str:
        rows = ["| examples | steps | train s | " + " | ".join(CURVE_COLUMNS) + " |",
                "|---:|---:|---:|" + "---:|" * len(CURVE_COLUMNS)]
        for p in self.points:
            cells = " | ".join(f"{p['overall'].get(c, 0):.3f}" for c in CURVE_COLUMNS)
            rows.append(f"| {p['n']} | {p['steps']} | {p['train_seconds']:.0f} | {cells} |")
        return "\n".join(rows)


def sft_learning_curve(settings: SFTSettings, layout: ArtifactLayout, datasets: Sequence[str],
                       sizes: Sequence[int | str], log: Callable[[str], None] = print,
                       *, seed: int = 0) -> LearningCurve:
    """Train and validate one adapter per size (``"all"``: every kept trajectory); see the module docstring."""
    from recthinker_dagster.training.callbacks import LogProgress
    from recthinker_dagster.training.sft import train_sft

    recipe = sft_recipe(settings)
    base_dir = base_model_folder(layout, recipe)
    records = read_kept_trajectories(layout)
    random.Random(seed).shuffle(records)
    counts = sorted({len(records) if size == "all" else min(int(size), len(records)) for size in sizes})
    suites = validation_suites(layout, datasets, settings.validation)
    agent = validation_agent(settings.validation)
    batch = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    points = []
    for n in counts:
        started, steps, adapters = time.perf_counter(), 0, []
        if n:
            steps = max(1, math.ceil(recipe.num_train_epochs * n / batch))
            run = recipe.with_overrides(max_steps=steps, save_steps=max(steps // 4, 1))
            work = layout.work_dir("sft_curve", run.digest, f"n{n}")
            log(f"SFT on {n} trajectories: {steps} steps of {batch} examples")
            result = train_sft(records[:n], base_dir, work, run, resume=settings.resume,
                               callbacks=[LogProgress(log, "loss")])
            adapters = [result.adapter_dir]
        trained = time.perf_counter()
        report = evaluate_policy(base_dir, adapters, suites, agent, batch_size=settings.validation.batch_size)
        points.append({"n": n, "steps": steps, "train_seconds": round(trained - started, 1),
                       "validate_seconds": round(time.perf_counter() - trained, 1),
                       "overall": report["overall"], "by_dataset": report["by_dataset"]})
        log(f"n={n}: " + ", ".join(f"{c} {report['overall'].get(c, 0):.3f}" for c in CURVE_COLUMNS))
    return LearningCurve(points, recipe.to_dict())
