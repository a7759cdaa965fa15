"""The ``sft_model`` stage: a LoRA adapter trained on the published SFT set, validated before and after.

    result = build_sft_model_stage(SFTSettings(recipe="smoke"), layout, ["ml-1m"], log=print)
    result.artifact.folder       # assets/sft_model: adapter/, metrics.json, validation.json, lineage.json
    result.artifact.cleanup      # the finished run's work folder, deleted once published

The run works in ``.work/sft_model/<fingerprint>/``: the fingerprint covers the recipe, the
SFT data version and the base model version, so an interrupted run resumes from its last
checkpoint while any change of its inputs starts a fresh one. Only the adapter is published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recthinker_dagster.artifacts import ArtifactLayout, read_kept_trajectories, tracked_md5
from recthinker_dagster.settings import SFTSettings
from recthinker_dagster.stages.filtering import base_model_folder
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.stages.validation import (
    validate_policies,
    validation_document,
    validation_metrics,
    validation_table,
)
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe

ASSET = "sft_model"
LOGGED_METRICS = ("final_loss", "train_loss", "train_seconds", "seconds_per_step", "tokens_per_second",
                  "trained_tokens_per_second", "tokens_seen", "global_step", "n_examples", "trainable_parameters")
SERIES = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy")


@dataclass
class SFTModelResult:
    artifact: StageArtifact
    metrics: dict  # the training run's metrics.json
    validation: dict  # {policy: evaluate_policy report}
    global_step: int
    resumed_from: str | None


def sft_recipe(settings: SFTSettings) -> SFTRecipe:
    recipe = load_recipe(settings.recipe)
    return recipe.with_overrides(max_steps=settings.max_steps) if settings.max_steps is not None else recipe


def file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def build_sft_model_stage(settings: SFTSettings, layout: ArtifactLayout, datasets: Sequence[str],
                          log: Callable[[str], None] = print, *, asset: str = ASSET,
                          data: tuple[list[dict], str] | None = None) -> SFTModelResult:
    """Train (or resume) the SFT adapter, validate the base model and the adapter, write ``assets/<asset>``.

    ``data``: the training records and their version (an md5); default the published
    ``filtered_trajectories`` (RecOne's cold start passes the thinking teacher's, ``stages/think.py``)."""
    from recthinker_dagster.training.callbacks import LogProgress
    from recthinker_dagster.training.distributed import launch_sft
    from recthinker_dagster.training.sft import train_sft

    recipe = sft_recipe(settings)
    base_dir = base_model_folder(layout, recipe)
    if data is None:
        data_dir = layout.asset_dir("filtered_trajectories")
        data = read_kept_trajectories(layout), tracked_md5(data_dir) or file_md5(data_dir / "trajectories.jsonl")
    records, data_md5 = data
    base_md5 = tracked_md5(base_dir) or str(base_dir)
    fingerprint = hashlib.sha256(f"{recipe.digest}|{data_md5}|{base_md5}".encode()).hexdigest()[:16]
    work_dir = layout.work_dir(asset, fingerprint)
    log(f"SFT recipe {recipe.name} v{recipe.version} ({recipe.digest}) on {len(records)} trajectories "
        f"in {layout.relative(work_dir)}")
    if recipe.num_processes > 1:
        result = launch_sft(records, base_dir, work_dir, recipe, resume=settings.resume, log=log)
    else:
        result = train_sft(records, base_dir, work_dir, recipe, resume=settings.resume,
                           callbacks=[LogProgress(log, "loss")])
    m = result.metrics
    log(f"trained to step {result.global_step} (resumed from {result.resumed_from}): final loss "
        f"{m['final_loss']}, {m['seconds_per_step']} s/step, {m['tokens_per_second']} tokens/s")

    policies: dict[str, list[Path]] = {"base_model": []} if settings.validate_base else {}
    policies[asset] = [result.adapter_dir]
    validation = validate_policies(layout, datasets, settings.validation, base_dir, policies, log)
    curve = None
    if settings.learning_curve_sizes:
        from recthinker_dagster.stages.sft_curve import sft_learning_curve

        curve = sft_learning_curve(settings, layout, datasets, settings.learning_curve_sizes, log)

    folder = layout.asset_dir(asset)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        shutil.copytree(result.adapter_dir, staging / "adapter")
        (staging / "metrics.json").write_text(json.dumps(m, indent=2))
        (staging / "validation.json").write_text(json.dumps(validation_document(settings.validation, validation), indent=2))
        (staging / "lineage.json").write_text(json.dumps({
            "base_model": layout.relative(base_dir), "base_model_md5": base_md5,
            "training_data_md5": data_md5, "recipe": recipe.to_dict(), "recipe_digest": recipe.digest,
            "adapters": ["adapter"],
        }, indent=2))
        if curve is not None:
            curve.write(staging / "learning_curve")
    steps = m["steps"]
    extra_metadata, extra_metrics, extra_artifacts = {}, {}, {}
    if curve is not None:
        extra_metadata["learning_curve"] = Markdown(curve.markdown())
        extra_metrics = curve.metrics()
        extra_artifacts["learning_curve"] = folder / "learning_curve"
    artifact = StageArtifact(
        folder,
        params={**{k: v for k, v in recipe.to_dict().items() if k != "filter"}, "recipe_digest": recipe.digest,
                "training_data_md5": data_md5, "base_model_md5": base_md5,
                "precision": m["precision"], "device": m["device"]},
        metrics={**{k: m[k] for k in LOGGED_METRICS if m.get(k) is not None}, **validation_metrics(validation),
                 **extra_metrics},
        metadata={
            "final_loss": m["final_loss"],
            "global_step": result.global_step,
            "resumed_from": result.resumed_from or "none",
            "train_seconds": m["train_seconds"],
            "seconds_per_step": m["seconds_per_step"],
            "tokens_per_second": m["tokens_per_second"],
            "examples": m["n_examples"],
            "validation": Markdown(validation_table(validation)),
            "loss_curve": Json([{"step": s["step"], "loss": s.get("loss")} for s in steps]),
            **extra_metadata,
        },
        texts={"validation.json": json.dumps(validation, indent=2), "metrics.json": json.dumps(m, indent=2)},
        series={name: [s[name] for s in steps if name in s] for name in SERIES},
        artifacts={"adapter": folder / "adapter", **extra_artifacts},
        cleanup=(work_dir,),  # published: the checkpoints are only for resuming
    )
    return SFTModelResult(artifact, m, validation, result.global_step, result.resumed_from)
