"""``registered_model``: the trained agent as a new MLflow Model Registry version, and the
``promotion_gate`` check that moves the ``champion`` alias only to a better agent.

The figures compared are the evaluation's: NDCG@10 (by default) of each system on the LLM
subset of the frozen eval tasks, per dataset and group, averaged over the groups. The gate
promotes when the candidate beats the current champion by ``margin``, significantly (a paired
test on the same eval tasks, ``p < significance_level``), and beats the untrained base model
with tools; otherwise the version gets the ``challenger`` alias and the reasons as
tags. The check warns (it never blocks): a challenger is a normal outcome.

What is registered and the ``registration.json`` record come from ``stages/registration.py``;
the MLflow calls from ``serving/pyfunc.py`` (logging) and ``serving/registry.py`` (aliases).
"""


import dagster as dg

from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import RegistryConfig
from recthinker_dagster.defs.publishing import publish_artifact
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.registration import (
    plan_registration,
    read_registration,
    write_registration,
)


def build_registry_assets(datasets: list[str]) -> list:
    @dg.asset(
        key=keys.REGISTERED_MODEL,
        deps=[keys.RL_MODEL, keys.SFT_MODEL, *keys.dataset_keys(datasets, "evaluation")],
        group_name=keys.AGENT_GROUP,
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

        settings = config.settings()
        plan = plan_registration(settings, paths.layout, datasets)
        mlflow_module.set_tracking_uri(mlflow.tracking_uri)
        version = log_agent_model(
            plan.base_model, plan.adapters, plan.tool_indexes, config=plan.serving,
            registered_model_name=settings.model_name, include_base_model=settings.include_base_model,
            input_example=plan.input_example, experiment_name=mlflow.experiment_name,
            artifact_location=mlflow.experiment_location(), run_name="registered_model",
            tags={"candidate_system": settings.candidate_system, "policy_md5": plan.policy_md5 or ""},
            metrics=plan.metrics,
        )
        context.log.info(f"registered {settings.model_name} version {version.version}")
        artifact = write_registration(settings, paths.layout, plan, str(version.version), version.run_id)
        return publish_artifact(context, keys.REGISTERED_MODEL, artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset_check(
        asset=keys.REGISTERED_MODEL,
        name="promotion_gate",
        blocking=False,
        description="Moves the 'champion' alias to the new version only if it beats the current champion by the margin, "
        "significantly (paired test on the same eval tasks), "
        "beats the untrained base model, and is not worse beyond noise than the policy it was trained from (SFT for "
        "SFT+RL); else 'challenger', with the reasons as version tags. Warns, never blocks.",
    )
    def promotion_gate(paths: ProjectPaths, mlflow: MLflowTracking) -> dg.AssetCheckResult:
        from mlflow import MlflowClient

        from recthinker_dagster.serving.registry import promote_registered_version

        gate = promote_registered_version(MlflowClient(tracking_uri=mlflow.tracking_uri), read_registration(paths.layout))
        decision = gate.decision
        if decision is None:
            return dg.AssetCheckResult(passed=True, metadata={"alias": gate.alias, "version": gate.version},
                                       description=f"version {gate.version} is already the champion")
        return dg.AssetCheckResult(
            passed=decision.promote,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "alias": gate.alias,
                "version": gate.version,
                "previous_champion": gate.previous_champion or "none",
                "candidate_value": decision.candidate_value,
                "champion_value": decision.champion_value if decision.champion_value is not None else "none",
                "base_value": decision.base_value,
                "p_value": decision.test["p_value"] if decision.test else "none",
                "paired_tasks": decision.test["n_tasks"] if decision.test else 0,
                "start_value": decision.start_value if decision.start_value is not None else "none",
                "keeps_start": "not compared" if decision.keeps_start is None else decision.keeps_start,
                "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            },
            description=f"version {gate.version} -> {gate.alias}: " + "; ".join(decision.reasons),
        )

    return [registered_model, promotion_gate]
