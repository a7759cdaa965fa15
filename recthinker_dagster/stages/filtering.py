"""The ``filtered_trajectories`` stage: the SFT set, judged from every dataset's teacher trajectories.

    result = build_filtered_trajectories_stage(FilterSettings(recipe="smoke"), layout, ["ml-1m"])
    result.totals["kept"], result.artifact.folder          # assets/filtered_trajectories
    report = check_sft_examples(layout, ["ml-1m"])          # the blocking Great Expectations check

Each dataset's trajectories go through the SFT recipe's ``filter`` section, guarded by that
dataset's eval users and (user, target) pairs; every verdict is kept with its reasons. The
folder is published by write-audit-publish: the blocking check's suite runs on the staged
folder, which replaces the published one only if it passes (else ``storage.AuditFailed``).
It holds ``trajectories.jsonl`` (the kept ones, each tagged with its dataset),
``decisions.parquet`` (one row per trajectory) and ``counts.json`` (the totals, the filter
and ``min_examples`` for the check).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from recthinker_dagster.artifacts import ArtifactLayout, read_table, read_teacher_trajectories
from recthinker_dagster.quality import QualityResult, validate_sft_examples
from recthinker_dagster.settings import FilterSettings
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.filtering import REASONS, filter_trajectories
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe

ASSET = "filtered_trajectories"
DECISIONS = "decisions.parquet"  # one row per teacher trajectory: kept or not, and why


@dataclass
class FilteredTrajectoriesResult:
    artifact: StageArtifact
    totals: dict  # counts over every dataset (kept, dropped, by reason, group, producer)
    by_dataset: dict  # the filter's counts per dataset


def base_model_folder(layout: ArtifactLayout, recipe: SFTRecipe) -> Path:
    """The recipe's backbone folder, else the pipeline's ``base_model`` asset."""
    return Path(recipe.base_model) if recipe.base_model else layout.asset_dir("base_model")


def build_filtered_trajectories_stage(settings: FilterSettings, layout: ArtifactLayout, datasets: Sequence[str],
                                      log: Callable[[str], None] = print, *, tokenizer=None) -> FilteredTrajectoriesResult:
    """Judge every dataset's teacher trajectories and publish the kept set, only if the staged
    set passes :func:`check_sft_folder`.

    ``tokenizer`` counts conversation lengths; None loads the recipe's base model's tokenizer."""
    recipe = load_recipe(settings.recipe)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model_folder(layout, recipe))
    kept: list[dict] = []
    decisions: list[dict] = []
    counts: dict[str, dict] = {}
    for dataset in datasets:
        eval_tasks = read_table(layout, "task_splits", dataset, "tasks_eval.parquet")
        result = filter_trajectories(
            read_teacher_trajectories(layout, dataset), recipe.filter_config, tokenizer=tokenizer,
            eval_users=eval_tasks["user_id"].cast(pl.Utf8).to_list(),
            eval_targets=set(eval_tasks.select(pl.col("user_id", "target_item_id").cast(pl.Utf8)).iter_rows()),
        )
        kept.extend(t.to_dict() | {"dataset": dataset} for t in result.kept)
        decisions.extend(row | {"dataset": dataset} for row in result.records())
        counts[dataset] = result.counts
        log(f"{dataset}: kept {result.counts['kept']} of {result.counts['total']}; "
            f"dropped by reason {result.counts['by_primary_reason']}")
    totals = combined_counts(counts)
    folder = layout.asset_dir(ASSET)
    remove_stale_staging(folder.parent)
    audit = partial(sft_audit, layout=layout, datasets=datasets)
    with staged_directory(folder, audit=audit, lock_dir=layout.lock_dir) as staging:
        with open(staging / "trajectories.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
        pl.DataFrame(decisions).with_columns(pl.col("reasons").list.join(",")).write_parquet(staging / DECISIONS)
        (staging / "counts.json").write_text(json.dumps({
            "total": totals, "by_dataset": counts, "filter": recipe.filter_config.to_dict(),
            "recipe": recipe.name, "recipe_digest": recipe.digest, "min_examples": settings.min_examples,
        }, indent=2))
    artifact = StageArtifact(
        folder,
        params={"recipe": recipe.name, "recipe_digest": recipe.digest, "datasets": ",".join(datasets),
                **{f"filter_{k}": v for k, v in recipe.filter_config.to_dict().items()}},
        metrics=filter_metrics(totals),
        metadata=filter_metadata(totals, counts),
        texts={"counts.json": json.dumps({"total": totals, "by_dataset": counts}, indent=2)},
    )
    return FilteredTrajectoriesResult(artifact, totals, counts)


def combined_counts(counts: dict) -> dict:
    """The filter's per-dataset counts summed over the datasets."""
    total: dict[str, Any] = {"total": 0, "kept": 0, "dropped": 0, "by_reason": {}, "by_primary_reason": {},
                             "by_group": {}, "by_producer": {}}
    for c in counts.values():
        for key in ("total", "kept", "dropped"):
            total[key] += c[key]
        for key in ("by_reason", "by_primary_reason"):
            for reason, n in c[key].items():
                total[key][reason] = total[key].get(reason, 0) + n
        for key in ("by_group", "by_producer"):
            for name, verdicts in c[key].items():
                slot = total[key].setdefault(name, {"kept": 0, "dropped": 0})
                for verdict, n in verdicts.items():
                    slot[verdict] += n
    return total


def filter_metrics(totals: dict) -> dict[str, float]:
    metrics = {"kept": totals["kept"], "dropped": totals["dropped"], "total": totals["total"],
               "kept_rate": totals["kept"] / max(totals["total"], 1)}
    metrics.update({f"dropped_{reason}": n for reason, n in totals["by_primary_reason"].items()})
    for kind in ("by_group", "by_producer"):
        for name, verdicts in totals[kind].items():
            metrics.update({f"{name}_{verdict}": n for verdict, n in verdicts.items()})
    return metrics


def filter_metadata(totals: dict, counts: dict) -> dict:
    return {
        "kept": totals["kept"],
        "dropped": totals["dropped"],
        "kept_rate": round(totals["kept"] / max(totals["total"], 1), 4),
        "dropped_by_reason": Markdown(reasons_markdown(totals)),
        "by_group": Json(totals["by_group"]),
        "by_teacher": Json(totals["by_producer"]),
        "by_dataset": Json({d: {"kept": c["kept"], "dropped": c["dropped"]} for d, c in counts.items()}),
    }


def reasons_markdown(totals: dict) -> str:
    """Markdown: per filter rule, the trajectories it dropped first and all that fail it."""
    rows = ["| reason | dropped (first reason) | trajectories failing it |", "|---|---:|---:|"]
    for reason in REASONS:
        rows.append(f"| `{reason}` | {totals['by_primary_reason'].get(reason, 0)} | {totals['by_reason'].get(reason, 0)} |")
    return "\n".join(rows)


# -- the blocking check ----------------------------------------------------------------------------


def eval_tasks_of(layout: ArtifactLayout, datasets: Sequence[str]) -> pl.DataFrame:
    """dataset, user_id, target_item_id of every eval task (the pairs SFT must never see)."""
    return pl.concat([
        read_table(layout, "task_splits", d, "tasks_eval.parquet")
        .select(pl.lit(d).alias("dataset"), pl.col("user_id").cast(pl.Utf8), pl.col("target_item_id").cast(pl.Utf8))
        for d in datasets
    ])


def kept_decisions(folder: Path) -> tuple[pl.DataFrame, int]:
    """The kept rows of ``folder``'s ``decisions.parquet`` and the ``min_examples`` they were filtered for."""
    min_examples = json.loads((folder / "counts.json").read_text())["min_examples"]
    return kept_rows(folder).with_columns(pl.col("user_id", "target_item_id").cast(pl.Utf8)), min_examples


def kept_rows(folder: Path) -> pl.DataFrame:
    """The rows of ``folder``'s decisions whose trajectory was kept for SFT."""
    return pl.read_parquet(folder / DECISIONS).filter(pl.col("kept"))


def check_sft_examples(layout: ArtifactLayout, datasets: Sequence[str]) -> QualityResult:
    """Great Expectations on the published SFT set (:func:`check_sft_folder`)."""
    return check_sft_folder(layout.asset_dir(ASSET), layout, datasets)


def check_sft_folder(folder: Path, layout: ArtifactLayout, datasets: Sequence[str]) -> QualityResult:
    """Great Expectations on the SFT set in ``folder`` (published or staged): enough examples,
    both groups, train tasks only, one per task, no eval-task user or target."""
    kept, min_examples = kept_decisions(folder)
    return validate_sft_examples(kept, eval_tasks_of(layout, datasets), min_examples)


def sft_audit(staged: Path, layout: ArtifactLayout, datasets: Sequence[str]) -> list[str]:
    """The write-audit-publish gate: :func:`check_sft_folder`'s failures on the staged folder."""
    report = check_sft_folder(staged, layout, datasets)
    return report.failures or ([] if report.success else ["sft_examples_quality failed"])
