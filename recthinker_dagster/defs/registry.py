"""``registered_model``: the trained agent as a new MLflow Model Registry version, and the
``promotion_gate`` check that moves the ``champion`` alias only to a better agent.

The figures compared are the evaluation's: NDCG@10 (by default) of each system on the LLM
subset of the frozen eval tasks, per dataset and group, averaged over the groups. The gate
promotes when the candidate beats the current champion by ``margin`` and beats the untrained
base model with tools; otherwise the version gets the ``challenger`` alias and the reasons as
tags. The check warns (it never blocks): a challenger is a normal outcome.
"""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.defs.config import RegistryConfig
from recthinker_dagster.defs.datasets import key_prefix, read_table
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.rl import RL_KEY
from recthinker_dagster.defs.tools import index_folders
from recthinker_dagster.defs.training import GROUP, SFT_KEY
from recthinker_dagster.storage import remove_stale_staging, staged_directory

REGISTERED_KEY = dg.AssetKey("registered_model")
REGISTRATION = "registration.json"
POLICY_ASSET = {"sft_rl": "rl_model", "sft": "sft_model"}


def system_figures(paths: ProjectPaths, datasets: list[str], system: str, metric: str) -> dict:
    """``{dataset: {group: {metric: value}}}`` of ``system`` on the LLM subset of the eval tasks."""
    figures = {}
    for dataset in datasets:
        path = paths.asset_dir("evaluation", dataset) / "summary.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: materialize {key_prefix(dataset)}/evaluation first")
        rows = pl.read_parquet(path).filter((pl.col("system") == system) & (pl.col("tasks") == "llm_subset"))
        if rows.is_empty():
            raise ValueError(f"{path} has no figures for system {system!r}: add it to the evaluation's systems")
        figures[dataset] = {row["group"]: {metric: float(row[metric])} for row in rows.iter_rows(named=True)}
    return figures


def _ref(folder: Path, dvc: DVCVersioning) -> dict:
    return {"path": str(folder), "md5": dvc.tracked_md5(folder) or ""}


def build_registry_assets(datasets: list[str]) -> list:
    evaluation_keys = [dg.AssetKey([key_prefix(d), "evaluation"]) for d in datasets]

    @dg.asset(
        key=REGISTERED_KEY,
        deps=[RL_KEY, SFT_KEY, *evaluation_keys],
        group_name=GROUP,
        kinds={"mlflow"},
        description="The trained agent as an MLflow pyfunc model (adapters packaged; base model and tool indexes "
        "as DVC-versioned references), registered as a new version.",
    )
    def registered_model(
        context: dg.AssetExecutionContext,
        config: RegistryConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        import mlflow as mlflow_module

        from recthinker_dagster.serving.pyfunc import log_agent_model

        if config.candidate_system not in POLICY_ASSET:
            raise ValueError(f"candidate_system must be one of {sorted(POLICY_ASSET)}, got {config.candidate_system!r}")
        candidate = system_figures(paths, datasets, config.candidate_system, config.metric)
        base = system_figures(paths, datasets, config.baseline_system, config.metric)
        policy_folder = paths.asset_dir(POLICY_ASSET[config.candidate_system])
        lineage = json.loads((policy_folder / "lineage.json").read_text())
        adapters = [paths.root_path / a for a in lineage["adapters"]]
        base_folder = paths.root_path / lineage["base_model"]
        profile = config.resolved_profile()
        serving = {"max_turns": profile.llm_max_turns, "max_tool_calls": profile.max_tool_calls,
                   "max_new_tokens": profile.llm_max_new_tokens, "prompt_history_len": profile.prompt_history_len}
        example = read_table(paths, "task_splits", datasets[0], "tasks_eval.parquet").row(0, named=True)
        flat = {f"{d}/{g}/{config.metric}": v[config.metric] for d, groups in candidate.items() for g, v in groups.items()}
        mlflow_module.set_tracking_uri(mlflow.tracking_uri)
        version = log_agent_model(
            _ref(base_folder, dvc),
            adapters,
            {d: {name: _ref(folder, dvc) for name, folder in index_folders(paths, d).items()} for d in datasets},
            config=serving,
            registered_model_name=config.model_name,
            include_base_model=config.include_base_model,
            input_example=[{"dataset": datasets[0], "user_id": str(example["user_id"]),
                            "candidate_item_ids": [str(i) for i in example["candidate_item_ids"][:5]]}],
            experiment_name=mlflow.experiment_name,
            artifact_location=mlflow.artifact_root if "://" in mlflow.artifact_root
            else Path(mlflow.artifact_root).resolve().as_uri(),
            run_name="registered_model",
            tags={"candidate_system": config.candidate_system, "policy_md5": dvc.tracked_md5(policy_folder) or ""},
            metrics=flat,
        )
        context.log.info(f"registered {config.model_name} version {version.version}")
        registration = {
            "model_name": config.model_name, "version": str(version.version), "run_id": version.run_id,
            "candidate_system": config.candidate_system, "baseline_system": config.baseline_system,
            "metric": config.metric, "margin": config.margin, "candidate": candidate, "base": base,
            "policy_md5": dvc.tracked_md5(policy_folder), "adapters": lineage["adapters"],
        }
        folder = paths.asset_dir("registered_model")
        remove_stale_staging(folder.parent)
        with staged_directory(folder) as staging:
            (staging / REGISTRATION).write_text(json.dumps(registration, indent=2))
        return publish(
            context,
            asset_key=REGISTERED_KEY,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"model_name": config.model_name, "version": str(version.version), "candidate_system": config.candidate_system},
            metrics=flat,
            metadata={
                "model_uri": f"models:/{config.model_name}/{version.version}",
                "version": str(version.version),
                "candidate": dg.MetadataValue.json(candidate),
                "base_model_with_tools": dg.MetadataValue.json(base),
            },
            texts={REGISTRATION: json.dumps(registration, indent=2)},
        )

    @dg.asset_check(
        asset=REGISTERED_KEY,
        name="promotion_gate",
        blocking=False,
        description="Moves the 'champion' alias to the new version only if it beats the current champion by the margin "
        "and beats the untrained base model; else 'challenger', with the reasons as version tags. Warns, never blocks.",
    )
    def promotion_gate(paths: ProjectPaths, mlflow: MLflowTracking) -> dg.AssetCheckResult:
        from mlflow import MlflowClient

        from recthinker_dagster.serving.promotion import decide_promotion
        from recthinker_dagster.serving.registry import (
            apply_promotion,
            champion_metrics,
            champion_version,
        )

        registration = json.loads((paths.asset_dir("registered_model") / REGISTRATION).read_text())
        name, version = registration["model_name"], registration["version"]
        client = MlflowClient(tracking_uri=mlflow.tracking_uri)
        current = champion_version(client, name)
        if current is not None and str(current.version) == version:
            return dg.AssetCheckResult(passed=True, metadata={"alias": "champion", "version": version},
                                       description=f"version {version} is already the champion")
        decision = decide_promotion(
            registration["candidate"], champion_metrics(client, name), registration["base"],
            metric=registration["metric"], margin=registration["margin"],
            champion_version=str(current.version) if current is not None else None,
        )
        outcome = apply_promotion(client, name, version, decision, registration["candidate"])
        return dg.AssetCheckResult(
            passed=decision.promote,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "alias": outcome["alias"],
                "version": version,
                "previous_champion": outcome["previous_champion"] or "none",
                "candidate_value": decision.candidate_value,
                "champion_value": decision.champion_value if decision.champion_value is not None else "none",
                "base_value": decision.base_value,
                "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            },
            description=f"version {version} -> {outcome['alias']}: " + "; ".join(decision.reasons),
        )

    return [registered_model, promotion_gate]
