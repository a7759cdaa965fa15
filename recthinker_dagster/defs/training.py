"""Training assets shared by all datasets: ``filtered_trajectories`` and ``sft_model``.

``filtered_trajectories`` judges every teacher trajectory of every dataset with the SFT recipe's
filter (the reasons are kept per trajectory) and guards the kept set with a blocking Great
Expectations check. ``sft_model`` trains a LoRA adapter on it with TRL and scores the agent on
a fixed validation slice before and after training. The training run works in
``.work/sft_model/<fingerprint>/`` (recipe, data and base model versions), so an interrupted
materialization resumes from its last checkpoint; only the finished adapter is published.
"""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.defs.config import FilterStageConfig, SFTTrainingConfig
from recthinker_dagster.defs.datasets import _check_result, key_prefix, read_table
from recthinker_dagster.defs.model import BASE_MODEL_KEY
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.tools import load_tool_indexes
from recthinker_dagster.quality import validate_sft_examples
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.filtering import REASONS, filter_trajectories
from recthinker_dagster.training.validation import (
    ValidationSuite,
    evaluate_policy,
    validation_slice,
)

GROUP = "agent"
FILTERED_KEY = dg.AssetKey("filtered_trajectories")
SFT_KEY = dg.AssetKey("sft_model")


def base_model_dir(paths: ProjectPaths, recipe) -> Path:
    """The recipe's backbone folder, else the pipeline's ``base_model`` asset."""
    return Path(recipe.base_model) if recipe.base_model else paths.asset_dir("base_model")


def eval_tasks_of(paths: ProjectPaths, datasets: list[str]) -> pl.DataFrame:
    return pl.concat([
        read_table(paths, "task_splits", d, "tasks_eval.parquet")
        .select(pl.lit(d).alias("dataset"), pl.col("user_id").cast(pl.Utf8), pl.col("target_item_id").cast(pl.Utf8))
        for d in datasets
    ])


def validation_suites(paths: ProjectPaths, datasets: list[str], n_tasks: int, prompt_history_len: int) -> list:
    """The same validation slice of every dataset, with its real tools."""
    suites = []
    for dataset in datasets:
        frame = validation_slice(read_table(paths, "task_splits", dataset, "tasks_valid.parquet"), n_tasks)
        indexes = load_tool_indexes(paths, dataset)
        suites.append(ValidationSuite(dataset, agent_tasks(frame, indexes, prompt_history_len), TaskToolboxes(indexes, frame)))
    return suites


def validate_policies(paths: ProjectPaths, datasets: list[str], settings: dict, prompt_history_len: int,
                      base_dir: Path, policies: dict, log) -> dict:
    """``{name: evaluate_policy report}`` of every policy (its adapter list) on the same slice."""
    suites = validation_suites(paths, datasets, settings["n_tasks"], prompt_history_len)
    agent = agent_config_from(settings)
    return {name: evaluate_policy(base_dir, adapters, suites, agent, batch_size=settings["batch_size"], progress=log)
            for name, adapters in policies.items()}


def agent_config_from(settings: dict) -> AgentConfig:
    return AgentConfig(
        max_turns=settings["max_turns"],
        max_tool_calls=settings["max_tool_calls"],
        sampling=SamplingParams(max_new_tokens=settings["max_new_tokens"]),
    )


def eval_settings(recipe, profile, n_tasks: int | None = None) -> dict:
    settings = {"n_tasks": 8, "max_turns": profile.max_turns, "max_tool_calls": profile.max_tool_calls,
                "max_new_tokens": 256, "batch_size": 8, **recipe.eval}
    if n_tasks is not None:
        settings["n_tasks"] = n_tasks
    return settings


def read_published_jsonl(path: Path, asset: str) -> list[dict]:
    """The records of a published JSON-lines artifact, read only: a bad line is an error naming
    it (the artifact is never repaired in place; rematerialize ``asset``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {asset} first")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON trajectory ({error.msg}); "
                             f"rematerialize {asset}") from error
    return records


def read_kept(paths: ProjectPaths) -> list[dict]:
    """The published SFT set."""
    return read_published_jsonl(paths.asset_dir("filtered_trajectories") / "trajectories.jsonl", "filtered_trajectories")


def build_training_assets(datasets: list[str]) -> list:
    trajectory_keys = [dg.AssetKey([key_prefix(d), "teacher_trajectories"]) for d in datasets]
    split_keys = [dg.AssetKey([key_prefix(d), "task_splits"]) for d in datasets]
    suite_keys = [dg.AssetKey([key_prefix(d), "tool_suite"]) for d in datasets]

    @dg.asset(
        key=FILTERED_KEY,
        deps=[*trajectory_keys, *split_keys, BASE_MODEL_KEY],
        group_name=GROUP,
        kinds={"dvc"},
        description="Teacher trajectories of every dataset kept or dropped by the SFT recipe's filter, "
        "with the reasons; the best survivor per task.",
    )
    def filtered_trajectories(
        context: dg.AssetExecutionContext,
        config: FilterStageConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        from transformers import AutoTokenizer

        recipe = config.load()
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir(paths, recipe))
        kept, decisions, counts = [], [], {}
        for dataset in datasets:
            records = read_published_jsonl(paths.asset_dir("teacher_trajectories", dataset) / "trajectories.jsonl",
                                           f"{key_prefix(dataset)}/teacher_trajectories")
            eval_tasks = read_table(paths, "task_splits", dataset, "tasks_eval.parquet")
            result = filter_trajectories(
                records, recipe.filter_config, tokenizer=tokenizer,
                eval_users=eval_tasks["user_id"].cast(pl.Utf8).to_list(),
                eval_targets=set(eval_tasks.select(pl.col("user_id", "target_item_id").cast(pl.Utf8)).iter_rows()),
            )
            kept.extend(t.to_dict() | {"dataset": dataset} for t in result.kept)
            decisions.extend(row | {"dataset": dataset} for row in result.records())
            counts[dataset] = result.counts
            context.log.info(f"{dataset}: kept {result.counts['kept']} of {result.counts['total']}; "
                             f"dropped by reason {result.counts['by_primary_reason']}")
        totals = _combined_counts(counts)
        folder = paths.asset_dir("filtered_trajectories")
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            with open(staging / "trajectories.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
            pl.DataFrame(decisions).with_columns(pl.col("reasons").list.join(",")).write_parquet(staging / "decisions.parquet")
            (staging / "counts.json").write_text(json.dumps({
                "total": totals, "by_dataset": counts, "filter": recipe.filter_config.to_dict(),
                "recipe": recipe.name, "recipe_digest": recipe.digest, "min_examples": config.min_examples,
            }, indent=2))
        metrics = {"kept": totals["kept"], "dropped": totals["dropped"], "total": totals["total"],
                   "kept_rate": totals["kept"] / max(totals["total"], 1)}
        metrics.update({f"dropped_{reason}": n for reason, n in totals["by_primary_reason"].items()})
        for kind in ("by_group", "by_producer"):
            for name, verdicts in totals[kind].items():
                metrics.update({f"{name}_{verdict}": n for verdict, n in verdicts.items()})
        return publish(
            context,
            asset_key=FILTERED_KEY,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"recipe": recipe.name, "recipe_digest": recipe.digest, "datasets": ",".join(datasets),
                    **{f"filter_{k}": v for k, v in recipe.filter_config.to_dict().items()}},
            metrics=metrics,
            metadata={
                "kept": totals["kept"],
                "dropped": totals["dropped"],
                "kept_rate": round(metrics["kept_rate"], 4),
                "dropped_by_reason": dg.MetadataValue.md(_reasons_markdown(totals)),
                "by_group": dg.MetadataValue.json(totals["by_group"]),
                "by_teacher": dg.MetadataValue.json(totals["by_producer"]),
                "by_dataset": dg.MetadataValue.json({d: {"kept": c["kept"], "dropped": c["dropped"]} for d, c in counts.items()}),
            },
            texts={"counts.json": json.dumps({"total": totals, "by_dataset": counts}, indent=2)},
        )

    @dg.asset_check(
        asset=FILTERED_KEY,
        name="sft_examples_quality",
        blocking=True,
        description="Great Expectations on the SFT set: at least min_examples trajectories, both user groups, "
        "train tasks only, one per task, no eval-task user or target. Blocking.",
    )
    def sft_examples_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        folder = paths.asset_dir("filtered_trajectories")
        decisions = pl.read_parquet(folder / "decisions.parquet")
        min_examples = json.loads((folder / "counts.json").read_text())["min_examples"]
        kept = decisions.filter(pl.col("kept")).with_columns(pl.col("user_id", "target_item_id").cast(pl.Utf8))
        return _check_result(validate_sft_examples(kept, eval_tasks_of(paths, datasets), min_examples), FILTERED_KEY)

    @dg.asset(
        key=SFT_KEY,
        deps=[FILTERED_KEY, BASE_MODEL_KEY, *split_keys, *suite_keys],
        group_name=GROUP,
        kinds={"pytorch", "dvc"},
        description="A LoRA adapter trained with TRL's SFTTrainer on the filtered trajectories (assistant tokens only), "
        "validated before and after training; resumable.",
    )
    def sft_model(
        context: dg.AssetExecutionContext,
        config: SFTTrainingConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        from recthinker_dagster.training.sft import train_sft

        recipe, profile = config.load(), config.resolved_profile()
        base_dir = base_model_dir(paths, recipe)
        records = read_kept(paths)
        data_md5 = dvc.tracked_md5(paths.asset_dir("filtered_trajectories")) or _file_digest(
            paths.asset_dir("filtered_trajectories") / "trajectories.jsonl")
        base_md5 = dvc.tracked_md5(base_dir) or str(base_dir)
        fingerprint = hashlib.sha256(f"{recipe.digest}|{data_md5}|{base_md5}".encode()).hexdigest()[:16]
        work_dir = paths.root_path / ".work" / "sft_model" / fingerprint
        context.log.info(f"SFT recipe {recipe.name} v{recipe.version} ({recipe.digest}) on {len(records)} trajectories "
                         f"in {work_dir.relative_to(paths.root_path)}")
        result = train_sft(records, base_dir, work_dir, recipe, resume=config.resume, callbacks=[_progress_callback(context)])
        m = result.metrics
        context.log.info(f"trained to step {result.global_step} (resumed from {result.resumed_from}): final loss "
                         f"{m['final_loss']}, {m['seconds_per_step']} s/step, {m['tokens_per_second']} tokens/s")

        settings = eval_settings(recipe, profile, config.eval_tasks_per_dataset)
        policies = {"base_model": []} if config.validate_base else {}
        policies["sft_model"] = [result.adapter_dir]
        validation = validate_policies(paths, datasets, settings, profile.prompt_history_len, base_dir, policies,
                                       context.log.info)

        folder = paths.asset_dir("sft_model")
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            shutil.copytree(result.adapter_dir, staging / "adapter")
            (staging / "metrics.json").write_text(json.dumps(m, indent=2))
            (staging / "validation.json").write_text(json.dumps({"settings": settings, **validation}, indent=2))
            (staging / "lineage.json").write_text(json.dumps({
                "base_model": relative_to_root(base_dir, paths), "base_model_md5": base_md5,
                "filtered_trajectories_md5": data_md5, "recipe": recipe.to_dict(), "recipe_digest": recipe.digest,
                "adapters": ["adapter"],
            }, indent=2))
        metrics = {k: m[k] for k in ("final_loss", "train_loss", "train_seconds", "seconds_per_step", "tokens_per_second",
                                     "trained_tokens_per_second", "tokens_seen", "global_step", "n_examples",
                                     "trainable_parameters") if m.get(k) is not None}
        metrics.update(_validation_metrics(validation))
        steps = m["steps"]
        publish_result = publish(
            context,
            asset_key=SFT_KEY,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={**{k: v for k, v in recipe.to_dict().items() if k not in ("filter", "eval")},
                    "recipe_digest": recipe.digest, "filtered_trajectories_md5": data_md5, "base_model_md5": base_md5,
                    "precision": m["precision"], "device": m["device"]},
            metrics=metrics,
            series={name: [s[name] for s in steps if name in s] for name in ("loss", "learning_rate", "grad_norm",
                                                                              "mean_token_accuracy")},
            artifacts={"adapter": folder / "adapter"},
            metadata={
                "final_loss": m["final_loss"],
                "global_step": result.global_step,
                "resumed_from": result.resumed_from or "none",
                "train_seconds": m["train_seconds"],
                "seconds_per_step": m["seconds_per_step"],
                "tokens_per_second": m["tokens_per_second"],
                "examples": m["n_examples"],
                "validation": dg.MetadataValue.md(validation_table(validation)),
                "loss_curve": dg.MetadataValue.json([{"step": s["step"], "loss": s.get("loss")} for s in steps]),
            },
            texts={"validation.json": json.dumps(validation, indent=2), "metrics.json": json.dumps(m, indent=2)},
        )
        shutil.rmtree(work_dir, ignore_errors=True)  # published; checkpoints are only for resuming
        return publish_result

    return [filtered_trajectories, sft_examples_check, sft_model]


# -- helpers -----------------------------------------------------------------------------------


def _combined_counts(counts: dict) -> dict:
    total = {"total": 0, "kept": 0, "dropped": 0, "by_reason": {}, "by_primary_reason": {}, "by_group": {}, "by_producer": {}}
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


def _reasons_markdown(totals: dict) -> str:
    rows = ["| reason | dropped (first reason) | trajectories failing it |", "|---|---:|---:|"]
    for reason in REASONS:
        rows.append(f"| `{reason}` | {totals['by_primary_reason'].get(reason, 0)} | {totals['by_reason'].get(reason, 0)} |")
    return "\n".join(rows)


VALIDATION_COLUMNS = ("ndcg@1", "ndcg@5", "ndcg@10", "valid_rate", "tool_calls_per_task", "completion_tokens_per_task")


def validation_table(validation: dict) -> str:
    """Markdown: one row per policy and dataset (and overall)."""
    rows = ["| policy | dataset | tasks | " + " | ".join(VALIDATION_COLUMNS) + " |",
            "|---|---|---:|" + "---:|" * len(VALIDATION_COLUMNS)]
    for policy, report in validation.items():
        for dataset, summary in [*report["by_dataset"].items(), ("overall", report["overall"])]:
            values = " | ".join(f"{summary.get(c, 0):.3f}" for c in VALIDATION_COLUMNS)
            rows.append(f"| {policy} | {dataset} | {summary.get('n_tasks', 0)} | {values} |")
    return "\n".join(rows)


def _validation_metrics(validation: dict) -> dict:
    metrics = {}
    for policy, report in validation.items():
        for scope, summary in [("overall", report["overall"]), *report["by_dataset"].items()]:
            for name in VALIDATION_COLUMNS:
                if name in summary:
                    metrics[f"valid_{policy}_{scope}_{name}"] = summary[name]
    return metrics


def _progress_callback(context, key: str = "loss"):
    """Log every training log line that has ``key`` to the Dagster run."""
    from transformers import TrainerCallback

    class DagsterProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and key in logs:
                context.log.info(f"step {state.global_step}/{state.max_steps}: {key} {logs[key]:.4f}, "
                                 f"lr {logs.get('learning_rate', 0):.2e}")

    return DagsterProgress()


def relative_to_root(path: Path, paths: ProjectPaths) -> str:
    """``path`` relative to the project root when it lies inside it (artifacts never record machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(paths.root_path))
    except ValueError:
        return str(path)


def _file_digest(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
