"""Training the agent: trajectory filtering, SFT and GRPO with LoRA, recipes, validation.

    from recthinker_dagster.training import FilterConfig, filter_trajectories, load_recipe, train_sft

    recipe = load_recipe("smoke")
    kept = filter_trajectories(teacher_trajectories, recipe.filter_config, tokenizer=tokenizer,
                               eval_users=eval_user_ids).kept
    result = train_sft(kept, "assets/base_model", ".work/sft_model/run", recipe)

Modules: ``filtering`` (which trajectories to imitate), ``data`` (tokenization with
assistant-only labels), ``device`` (device, threads and precision), ``sft`` and ``grpo`` (the
trainers), ``rewards``, ``recipes`` / ``rl_recipes`` and ``validation`` (scoring a policy on
fixed validation slices). Loading a trained policy is ``recthinker_dagster.models.loading``.
Nothing here imports Dagster, MLflow or DVC; torch, transformers, TRL and PEFT are imported
when a function needs them.
"""

from recthinker_dagster.training.data import (
    sft_examples,
    tokenize_conversation,
    training_chat_template,
)
from recthinker_dagster.training.filtering import (
    REASONS,
    Decision,
    FilterConfig,
    FilterResult,
    filter_trajectories,
)
from recthinker_dagster.training.recipes import (
    SFTRecipe,
    available_recipes,
    load_recipe,
)
from recthinker_dagster.training.sft import SFTResult, train_sft
from recthinker_dagster.training.validation import (
    ValidationSuite,
    evaluate_policy,
    summarize_trajectories,
    validation_slice,
)

__all__ = [
    "REASONS",
    "Decision",
    "FilterConfig",
    "FilterResult",
    "SFTRecipe",
    "SFTResult",
    "ValidationSuite",
    "available_recipes",
    "evaluate_policy",
    "filter_trajectories",
    "load_recipe",
    "sft_examples",
    "summarize_trajectories",
    "tokenize_conversation",
    "train_sft",
    "training_chat_template",
    "validation_slice",
]
