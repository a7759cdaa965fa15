"""The ``rl_model`` asset: GRPO on top of the SFT adapter, over real tool-using rollouts.

Train tasks of every dataset (a fixed, group-balanced sample of ``n_train_tasks`` each) are the
prompts; the rollouts run the real agent loop and tools. The run works in
``.work/rl_model/<fingerprint>/`` (recipe and SFT adapter versions), so an interrupted
materialization resumes from its last checkpoint. After training the SFT adapter and the
SFT+RL policy are scored on the same validation slice.
"""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg

from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.defs.config import RLStageConfig
from recthinker_dagster.defs.datasets import key_prefix, read_table
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.tools import load_tool_indexes
from recthinker_dagster.defs.training import (
    GROUP,
    SFT_KEY,
    _progress_callback,
    _validation_metrics,
    eval_settings,
    relative_to_root,
    validate_policies,
    validation_table,
)
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.validation import validation_slice

RL_KEY = dg.AssetKey("rl_model")
SERIES = ("reward", "reward_std", "frac_reward_zero_std", "kl", "learning_rate", "completions/mean_length",
          "tools/call_frequency", "tools/failure_rate", "rollout/valid_rate", "rollout/ndcg@10")


class DatasetToolboxes:
    """A toolbox factory over several datasets: each task goes to its own dataset's tools."""

    def __init__(self, factories: dict):
        self.factories = factories

    def __call__(self, task):
        return self.factories[task.dataset](task)


def policy_lineage(paths: ProjectPaths) -> dict:
    """The published SFT policy: its base model folder and adapter folder (absolute)."""
    folder = paths.asset_dir("sft_model")
    lineage_file = folder / "lineage.json"
    if not lineage_file.exists():
        raise FileNotFoundError(f"{lineage_file} is missing: materialize sft_model first")
    lineage = json.loads(lineage_file.read_text())
    base = Path(lineage["base_model"])
    return {"base_model": base if base.is_absolute() else paths.root_path / base, "sft_adapter": folder / "adapter"}


def build_rl_assets(datasets: list[str]) -> list:
    split_keys = [dg.AssetKey([key_prefix(d), "task_splits"]) for d in datasets]
    suite_keys = [dg.AssetKey([key_prefix(d), "tool_suite"]) for d in datasets]

    @dg.asset(
        key=RL_KEY,
        deps=[SFT_KEY, *split_keys, *suite_keys],
        group_name=GROUP,
        kinds={"pytorch", "dvc"},
        description="A LoRA adapter trained with TRL's GRPOTrainer on top of the SFT policy, over multi-turn rollouts "
        "with the real tools; rewards: ranking (NDCG@10), format, tool efficiency. Resumable.",
    )
    def rl_model(
        context: dg.AssetExecutionContext,
        config: RLStageConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        from recthinker_dagster.training.grpo import train_grpo

        recipe, profile = config.load(), config.resolved_profile()
        policy = policy_lineage(paths)
        sft_md5 = dvc.tracked_md5(paths.asset_dir("sft_model")) or "untracked"
        tasks, factories = [], {}
        for dataset in datasets:
            frame = validation_slice(read_table(paths, "task_splits", dataset, "tasks_train.parquet"), recipe.n_train_tasks)
            indexes = load_tool_indexes(paths, dataset)
            tasks.extend(agent_tasks(frame, indexes, profile.prompt_history_len))
            factories[dataset] = TaskToolboxes(indexes, frame)
        fingerprint = hashlib.sha256(f"{recipe.digest}|{sft_md5}|{','.join(datasets)}".encode()).hexdigest()[:16]
        work_dir = paths.root_path / ".work" / "rl_model" / fingerprint
        context.log.info(f"GRPO recipe {recipe.name} v{recipe.version} ({recipe.digest}) on {len(tasks)} train tasks, "
                         f"{recipe.num_generations} rollouts each per step, in {work_dir.relative_to(paths.root_path)}")
        result = train_grpo(tasks, DatasetToolboxes(factories), policy["base_model"], [policy["sft_adapter"]], work_dir,
                            recipe, resume=config.resume, callbacks=[_progress_callback(context, key="reward")])
        m = result.metrics
        context.log.info(f"GRPO to step {result.global_step}: {m['seconds_per_step']} s/step, split "
                         f"{m['time_split_per_step']}, final reward {m['final_reward']}")

        settings = eval_settings(recipe, profile, config.eval_tasks_per_dataset)
        validation = validate_policies(
            paths, datasets, settings, profile.prompt_history_len, policy["base_model"],
            {"sft_model": [policy["sft_adapter"]], "rl_model": [policy["sft_adapter"], result.adapter_dir]},
            context.log.info,
        )
        folder = paths.asset_dir("rl_model")
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            shutil.copytree(result.adapter_dir, staging / "adapter")
            (staging / "metrics.json").write_text(json.dumps(m, indent=2))
            (staging / "validation.json").write_text(json.dumps({"settings": settings, **validation}, indent=2))
            (staging / "lineage.json").write_text(json.dumps({
                "base_model": relative_to_root(policy["base_model"], paths), "sft_model_md5": sft_md5,
                "adapters": [relative_to_root(policy["sft_adapter"], paths), relative_to_root(folder / "adapter", paths)],
                "recipe": recipe.to_dict(), "recipe_digest": recipe.digest,
            }, indent=2))
        steps = m["steps"]
        last = steps[-1] if steps else {}
        metrics = {k: m[k] for k in ("train_seconds", "seconds_per_step", "global_step", "final_reward", "n_tasks",
                                     "trainable_parameters") if m.get(k) is not None}
        metrics.update({f"time_{k}": v for k, v in m["time_split_per_step"].items() if v is not None})
        metrics.update({f"last_{k}": v for k, v in last.items() if k != "step" and isinstance(v, (int, float))})
        metrics.update(_validation_metrics(validation))
        series = {name: [s[name] for s in steps if name in s] for name in SERIES}
        series.update({k: [s[k] for s in steps if k in s] for k in sorted({k for s in steps for k in s if k.startswith("rewards/")})})
        publish_result = publish(
            context,
            asset_key=RL_KEY,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={**{k: v for k, v in recipe.to_dict().items() if k != "eval"}, "recipe_digest": recipe.digest,
                    "sft_model_md5": sft_md5, "precision": m["precision"], "device": m["device"]},
            metrics=metrics,
            series={k: v for k, v in series.items() if v},
            artifacts={"adapter": folder / "adapter"},
            metadata={
                "global_step": result.global_step,
                "resumed_from": result.resumed_from or "none",
                "seconds_per_step": m["seconds_per_step"],
                "time_split_per_step": dg.MetadataValue.json(m["time_split_per_step"]),
                "final_reward": m["final_reward"],
                "reward_curve": dg.MetadataValue.json([{k: s.get(k) for k in ("step", "reward", "reward_std",
                                                                               "frac_reward_zero_std")} for s in steps]),
                "health": dg.MetadataValue.json(last),
                "validation": dg.MetadataValue.md(validation_table(validation)),
            },
            texts={"validation.json": json.dumps(validation, indent=2), "metrics.json": json.dumps(m, indent=2)},
        )
        shutil.rmtree(work_dir, ignore_errors=True)
        return publish_result

    return [rl_model]

