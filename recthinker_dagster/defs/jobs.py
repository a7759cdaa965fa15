"""Jobs, once per named profile: the whole pipeline, the think-before-recommend branch (RecZero,
RecOne: the ``think`` group), the headline evaluation (every system, both answer modes of the
trained agents, on the paper's task counts) and the data branches alone (``data_<profile>``).

Selections are asset *objects*, never selection strings: DVC pins an antlr runtime that
breaks Dagster's string selection parser.
"""

from __future__ import annotations

import dagster as dg

from recthinker_dagster.artifacts import key_prefix
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import (
    BaseModelConfig,
    EvaluationConfig,
    FilterStageConfig,
    IngestConfig,
    RegistryConfig,
    RLStageConfig,
    SFTTrainingConfig,
    TaskSplitConfig,
    TeacherConfig,
    ThinkConfig,
    ToolIndexesConfig,
)
from recthinker_dagster.defs.think import GROUP as THINK_GROUP
from recthinker_dagster.settings import CLASSICAL_SYSTEMS, PROFILE_NAMES, THINK_SYSTEMS

# the headline table (docs/results.md): every system; the trained agents in both answer modes
# (the untrained base model never answers on its own, so its two modes rank alike)
HEADLINE_SYSTEMS = (*CLASSICAL_SYSTEMS, "teacher", "zero_shot", "base_tools", "sft", "sft@logits", "sft_rl",
                    "sft_rl@logits", *THINK_SYSTEMS)
HEADLINE_LLM_TASKS = {"smoke": 4, "demo": 100, "full": 0}  # per dataset over both groups; 0: every eval task


def profile_run_config(profile: str, datasets: list[str], *, data_only: bool = False) -> dg.RunConfig:
    """Every asset's config naming ``profile`` (op names: ``<prefix>__<asset>`` per dataset);
    ``data_only``: the base model and the per-dataset branches without the evaluation."""
    ops: dict[str, dg.Config] = {"base_model": BaseModelConfig(profile=profile)}
    if not data_only:
        ops.update({
            "filtered_trajectories": FilterStageConfig(profile=profile),
            "sft_model": SFTTrainingConfig(profile=profile),
            "rl_model": RLStageConfig(profile=profile),
            "registered_model": RegistryConfig(profile=profile),
        })
    for dataset in datasets:
        prefix = key_prefix(dataset)
        ops[f"{prefix}__raw_dataset"] = IngestConfig(profile=profile)
        ops[f"{prefix}__ingest"] = IngestConfig(profile=profile)
        ops[f"{prefix}__task_splits"] = TaskSplitConfig(profile=profile)
        ops[f"{prefix}__tool_indexes"] = ToolIndexesConfig(profile=profile)
        ops[f"{prefix}__teacher_trajectories"] = TeacherConfig(profile=profile)
        if not data_only:
            ops[f"{prefix}__evaluation"] = EvaluationConfig(profile=profile)
    return dg.RunConfig(ops=ops)


def pipeline_jobs(datasets: list[str]) -> list:
    return [
        dg.define_asset_job(
            f"pipeline_{name}",
            selection=dg.AssetSelection.all() - dg.AssetSelection.groups(THINK_GROUP),
            config=profile_run_config(name, datasets),
            description=f"The whole RecThinker pipeline with the '{name}' profile.",
            tags={"profile": name},
        )
        for name in PROFILE_NAMES
    ]


def think_run_config(profile: str, datasets: list[str]) -> dg.RunConfig:
    """The think assets' config naming ``profile``."""
    names = ["recone_sft_model", "recone_model", "reczero_model",
             *(f"{key_prefix(dataset)}__think_trajectories" for dataset in datasets)]
    return dg.RunConfig(ops={name: ThinkConfig(profile=profile) for name in names})


def think_jobs(datasets: list[str]) -> list:
    """``think_<profile>``: the thinking teacher's trajectories, RecOne (SFT, then GRPO) and RecZero
    (GRPO from the base model). Score them with the evaluation's systems ``reczero`` and ``recone``."""
    return [
        dg.define_asset_job(
            f"think_{name}",
            selection=dg.AssetSelection.groups(THINK_GROUP),
            config=think_run_config(name, datasets),
            description=f"Think before recommend (RecZero, RecOne) with the '{name}' profile.",
            tags={"profile": name},
        )
        for name in PROFILE_NAMES
    ]


def headline_jobs(datasets: list[str]) -> list:
    """``headline_<profile>``: the evaluation of every system (``HEADLINE_SYSTEMS``) on
    ``HEADLINE_LLM_TASKS`` LLM tasks per dataset. Needs the pipeline's and the think job's trained
    policies (``scripts/headline_table.sh`` runs what is missing, then writes docs/results.md)."""
    return [
        dg.define_asset_job(
            f"headline_{name}",
            selection=dg.AssetSelection.assets(*(keys.dataset_key(dataset, "evaluation") for dataset in datasets)),
            config=dg.RunConfig(ops={
                f"{key_prefix(dataset)}__evaluation": EvaluationConfig(
                    profile=name, systems=list(HEADLINE_SYSTEMS), llm_tasks=HEADLINE_LLM_TASKS[name])
                for dataset in datasets}),
            description=f"The headline table with the '{name}' profile: every system, the trained agents in both "
                        f"answer modes, {HEADLINE_LLM_TASKS[name] or 'all'} LLM tasks per dataset.",
            tags={"profile": name},
        )
        for name in PROFILE_NAMES
    ]


def data_jobs(datasets: list[str]) -> list:
    """``data_<profile>``: every dataset's branch (raw data, quality gates, task splits, tool
    indexes, teacher trajectories) and the base model (its tokenizer counts the trajectories'
    tokens), without training or evaluation. The branches are independent: under
    ``RECTHINKER_EXECUTOR=multiprocess`` they run side by side."""
    branch = dg.AssetSelection.groups(*(key_prefix(dataset) for dataset in datasets)) | dg.AssetSelection.assets(
        keys.BASE_MODEL)
    evaluations = dg.AssetSelection.assets(*(keys.dataset_key(dataset, "evaluation") for dataset in datasets))
    return [
        dg.define_asset_job(
            f"data_{name}",
            selection=branch - evaluations,
            config=profile_run_config(name, datasets, data_only=True),
            description=f"Every dataset's data, tool indexes and teacher trajectories with the '{name}' profile.",
            tags={"profile": name},
        )
        for name in PROFILE_NAMES
    ]
