"""Training the agent: trajectory filtering, SFT with LoRA, recipes.

    from recthinker_dagster.training import FilterConfig, filter_trajectories, load_recipe, train_sft

    recipe = load_recipe("smoke")
    kept = filter_trajectories(teacher_trajectories, recipe.filter_config, tokenizer=tokenizer,
                               eval_users=eval_user_ids).kept
    result = train_sft(kept, "assets/base_model", "assets/sft_model/ml-1m", recipe)

Nothing here imports Dagster, MLflow or DVC; torch, transformers, TRL and PEFT are imported
when a function needs them.
"""

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
from recthinker_dagster.training.sft import (
    SFTResult,
    evaluate_adapter,
    summarize_trajectories,
    tokenize_conversation,
    train_sft,
    training_chat_template,
)

__all__ = [
    "REASONS",
    "Decision",
    "FilterConfig",
    "FilterResult",
    "SFTRecipe",
    "SFTResult",
    "available_recipes",
    "evaluate_adapter",
    "filter_trajectories",
    "load_recipe",
    "summarize_trajectories",
    "tokenize_conversation",
    "train_sft",
    "training_chat_template",
]
