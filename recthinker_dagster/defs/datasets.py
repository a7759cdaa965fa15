"""Per-dataset assets: raw files, normalized tables and the evaluation protocol.

``build_dataset_assets("ml-1m")`` returns the assets and checks of one dataset under the
key prefix ``ml_1m``; the definitions module builds one set per configured dataset, so
the asset graph shows a parallel chain per dataset and each has its own versions. The work
itself is in ``stages.ingest`` and ``stages.splits``.

Nothing unvalidated is versioned: ``raw_dataset`` parses the raw files and runs the table
suites before ``dvc add data``; ``ingest`` and ``task_splits`` audit their staged output
with the same suites as their blocking checks and publish only what passed
(``defs.publishing.audited``). The checks still run on the published artifacts.
"""

import dagster as dg

from recthinker_dagster.artifacts import TABLES, key_prefix
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import IngestConfig, TaskSplitConfig
from recthinker_dagster.defs.publishing import (
    Gate,
    audited,
    check_result,
    publication_lock,
    publish_artifact,
    report_rejection,
)
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.stages.ingest import (
    RawDataRejected,
    build_ingest_stage,
    build_raw_dataset_stage,
    validate_data_folder,
    validate_published_table,
)
from recthinker_dagster.stages.splits import build_task_splits_stage, validate_published_splits

TABLE_DOCS = {
    "interactions": "All interactions in the normalized schema: user_id, item_id, rating, timestamp, order.",
    "items": "Item catalog: title, year, categories, creator, description, has_metadata.",
    "users": "Users: gender, age, occupation, zip_code, has_demographics.",
}

SPLITS_CHECK = "protocol_quality"
SPLITS_CHECK_DOC = (
    "Great Expectations suite on the tasks: schema, unique ids, candidate validity "
    "(target once, distinct, negatives never in the user's history) and no leakage of "
    "validation/test targets into the training-visible interactions. Blocking."
)


def build_dataset_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    raw_key = keys.dataset_key(dataset, "raw_dataset")
    table_keys = {name: keys.dataset_key(dataset, name) for name in TABLES}
    splits_key = keys.dataset_key(dataset, "task_splits")
    table_checks = {name: dg.AssetCheckKey(key, table_check_name(name)) for name, key in table_keys.items()}

    @dg.asset(
        key=raw_key,
        group_name=prefix,
        kinds={"dvc"},
        description=f"The original {dataset} files in data/{dataset}/ (downloaded when absent), validated by the "
        "table suites, then tracked by data.dvc.",
    )
    def raw_dataset(
        context: dg.AssetExecutionContext, config: IngestConfig, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ):
        settings, data_dvc = config.settings(), ""
        versioned = dvc.enabled and paths.data_path.is_relative_to(paths.root_path)
        try:
            raw = build_raw_dataset_stage(settings, paths.layout, dataset, extra_params={"profile": config.profile})
            if versioned and raw.files:  # `dvc add data` versions every dataset in it: all must pass
                validate_data_folder(settings, paths.layout, validated=[dataset])
        except RawDataRejected as rejected:
            own = rejected.dataset == dataset
            checks = {table_checks[name]: report.failures for name, report in rejected.reports.items() if own}
            failure = yield from report_rejection(context, rejected, checks, {raw_key: ""})
            raise failure from rejected
        tags = {"asset": raw_key.to_user_string(), "dagster_run_id": context.run.run_id, "files_md5": raw.files_md5}
        if versioned and raw.files:
            with publication_lock(context, paths, [paths.data_path]):
                data_dvc = tags["dvc_md5"] = dvc.track(paths.data_path)["md5"]  # keeps data.dvc current
        run_id = mlflow.log_run(raw_key.to_user_string(), params=raw.params, metrics=raw.metrics, tags=tags)
        yield dg.MaterializeResult(
            metadata={
                "files": dg.MetadataValue.json(raw.sizes),
                "files_md5": raw.files_md5,
                "validated_rows": dg.MetadataValue.json(raw.validated_rows),
                "data_dvc_md5": data_dvc,
                "mlflow_run_id": run_id,
            },
            data_version=dg.DataVersion(raw.files_md5),
        )

    @dg.multi_asset(
        name=f"{prefix}__ingest",
        specs=[
            dg.AssetSpec(key, deps=[raw_key], group_name=prefix, kinds={"polars", "dvc"}, description=TABLE_DOCS[name])
            for name, key in table_keys.items()
        ],
    )
    def ingest(
        context: dg.AssetExecutionContext, config: IngestConfig, paths: ProjectPaths, dvc: DVCVersioning, mlflow: MLflowTracking
    ):
        gates = {paths.asset_dir(name, dataset): Gate(key, table_checks[name]) for name, key in table_keys.items()}
        with publication_lock(context, paths, gates):
            result = yield from audited(context, paths, gates, lambda: build_ingest_stage(
                config.settings(), paths.layout, dataset, log=context.log.info, extra_params={"profile": config.profile},
                warn=context.log.warning,  # every cleaning action, as a warning in the run's log
            ))
            for name, artifact in result.tables.items():
                yield publish_artifact(context, table_keys[name], artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset(
        key=splits_key,
        deps=[table_keys["interactions"], table_keys["items"]],
        group_name=prefix,
        kinds={"polars", "dvc"},
        description=(
            "Evaluation protocol: leave-last-out targets, sparse/dense groups, seeded candidate sets; "
            "train/valid/eval tasks and the training-visible interactions."
        ),
    )
    def task_splits(
        context: dg.AssetExecutionContext,
        config: TaskSplitConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ):
        gates = {paths.asset_dir("task_splits", dataset): Gate(splits_key, dg.AssetCheckKey(splits_key, SPLITS_CHECK))}
        with publication_lock(context, paths, gates):
            result = yield from audited(context, paths, gates, lambda: build_task_splits_stage(
                config.settings(), paths.layout, dataset, log=context.log.info
            ))
            yield publish_artifact(context, splits_key, result.artifact, paths=paths, dvc=dvc, mlflow=mlflow)

    @dg.asset_check(asset=splits_key, name=SPLITS_CHECK, blocking=True, description=SPLITS_CHECK_DOC)
    def splits_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        return check_result(validate_published_splits(paths.layout, dataset), splits_key)

    checks = [table_check(dataset, name, key) for name, key in table_keys.items()]
    return [raw_dataset, ingest, task_splits, *checks, splits_check]


def table_check(dataset: str, name: str, key: dg.AssetKey) -> dg.AssetChecksDefinition:
    """The blocking Great Expectations check of one ingested table."""

    @dg.asset_check(
        asset=key,
        name=table_check_name(name),
        blocking=True,
        description=f"Great Expectations suite on {name}: schema, nulls, ranges and duplicates. Blocking.",
    )
    def quality_check(paths: ProjectPaths) -> dg.AssetCheckResult:
        return check_result(validate_published_table(paths.layout, dataset, name), key)

    return quality_check


def table_check_name(table: str) -> str:
    """The name of a table's blocking quality check (``interactions_quality``)."""
    return f"{table}_quality"
