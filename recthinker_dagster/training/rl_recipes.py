"""RL (GRPO) recipes: every knob of an RL run, in versioned files ``recipes/rl_<name>.yaml``.

    recipe = load_rl_recipe("smoke")                   # recipes/rl_smoke.yaml
    recipe = load_rl_recipe("my_rl.yaml").with_overrides(max_steps=2)

Unknown keys are an error. ``conversation`` picks the rollouts: ``tools`` (the agent's
Analyze-Plan-Act loop with tools) or ``think`` (``agent/think.py``: one tool-free turn of tagged
reasoning, then the answer; the RecZero and RecOne recipes). ``reward_weights`` name rewards of ``training.rewards.REWARDS``;
``reward_params`` go to every reward (``correct_k``: the rank a correct answer reaches).
The validation run after training is a run setting (``rl.validation`` in ``profiles/<name>.yaml``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from recthinker_dagster.training.recipes import (
    LORA_TARGETS,
    PRECISIONS,
    RecipeFields,
    read_recipe_file,
    recipe_path,
)
from recthinker_dagster.training.rewards import check_weights

CONVERSATIONS = ("tools", "think")
TASK_POOLS = ("train", "unimitated")  # the RL task pools (stages/rl.py, rl_tasks)
ANSWER_CREDITS = ("all", "until_target")  # which sampled tokens get their rollout's advantage (grpo_trainer.py)


@dataclass(frozen=True)
class RLRecipe(RecipeFields):
    _KIND = "RL recipe"
    _MAPPINGS = ("reward_weights", "reward_params")
    # trim_padding, shared_prompts and merged_rollouts change how the passes run, not what they
    # compute (round-off aside): out of the digest too
    _PLACEMENT = ("num_processes", "trim_padding", "shared_prompts", "merged_rollouts")

    name: str
    version: int = 1
    description: str = ""
    # the RL LoRA adapter, trained on the base model with the SFT adapter merged in
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    # GRPO
    max_steps: int = 2
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_generations: int = 2  # rollouts per task (the GRPO group)
    per_device_train_batch_size: int = 2  # rollouts per optimizer micro-step (a multiple of num_generations)
    gradient_accumulation_steps: int = 1
    beta: float = 0.0  # KL coefficient to the SFT policy; 0 skips the reference model
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    top_p: float = 1.0
    # the answer's labels are sampled at this temperature (None: at temperature), the tool calls
    # and the rest at temperature: exploring rankings without breaking calls (generate mode, local backend)
    answer_temperature: float | None = None
    # weight of the policy-gradient term on the sampled tokens outside the answer's labels (analysis,
    # tool calls); the labels weigh 1. Below 1 a step moves the ranking more than the calls (the KL
    # term still holds every sampled token). Needs the local backend's answer constraint (generate mode)
    non_answer_weight: float = 1.0
    # "all": every sampled token gets its rollout's advantage; "until_target": none after the
    # answer placed the target (the reward is settled there; the later labels' advantage is noise)
    answer_credit: str = "all"
    # show each task's candidates in a fresh seeded order at every step (grpo.ToolRollout.shown_task):
    # the target's label changes between visits, so no label stands in for the item
    relabel_candidates: bool = False
    # with relabel_candidates: every rollout of a group gets its own order, not one per group, so the
    # group's advantages (which sum to 0) cancel on any preference for a label and keep the item's signal
    relabel_each_rollout: bool = False
    # rollouts: the conversation, the agent's budgets and the tasks
    conversation: str = "tools"  # "tools": the agent; "think": think before recommend, no tools (RecZero, RecOne)
    max_turns: int = 4
    max_tool_calls: int = 4
    max_new_tokens: int = 192  # per assistant turn
    rollout_batch_size: int = 8  # conversations per generate call
    n_train_tasks: int = 0  # train tasks per dataset in the RL set (0: all), spread over the groups
    # task screening (training/task_screening.py): 0 takes the first n_train_tasks; N > 0 samples the
    # start policy on the first N train tasks per dataset and keeps the n_train_tasks whose rewards vary most
    screen_pool: int = 0
    screen_rollouts: int = 4  # sampled rollouts per pool task
    # which train tasks: "train" (all) or "unimitated" (none of their teacher trajectories passed the
    # quality filter, so SFT never imitated a solution of theirs: the policy's rankings there have room)
    task_pool: str = "train"
    # rewards
    reward_weights: dict = field(default_factory=lambda: {"ranking": 1.0, "format": 0.1, "tool_efficiency": 0.1})
    reward_params: dict = field(default_factory=lambda: {"correct_k": 5})
    # precision, device, checkpoints, reproducibility
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # score each log-prob pass (the reference's chunks, each loss micro-batch) without the columns
    # that are padding in all its rows (grpo_trainer.py): a short rollout stops paying for a long one.
    # With per_device_train_batch_size 1 no padding is left and the attention runs without a mask
    trim_padding: bool = False
    # passes without gradient (the reference's, for the KL) run each group's shared prompt once and
    # score its rollouts' completions against its KV (grpo_trainer.py)
    shared_prompts: bool = False
    # sample in-process rollouts with the LoRA adapter merged into the weights (training/merged_sampling.py)
    merged_rollouts: bool = False
    device: str = "auto"
    num_threads: int | None = None
    # data parallelism, as in SFT recipes: each process accumulates gradient_accumulation_steps /
    # num_processes micro-batches and samples that share of the step's rollouts
    num_processes: int = 1
    logging_steps: int = 1
    save_steps: int = 1
    save_total_limit: int | None = 2
    seed: int = 2026

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO compares rollouts of the same task")
        if (self.per_device_train_batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError("per_device_train_batch_size * gradient_accumulation_steps must be a multiple of "
                             f"num_generations ({self.num_generations})")
        if self.max_steps < 1 or self.max_turns < 1 or self.max_tool_calls < 0:
            raise ValueError("max_steps and max_turns must be >= 1, max_tool_calls >= 0")
        check_weights(self.reward_weights)
        if self.screen_pool and not (self.n_train_tasks > 0 and self.screen_pool >= self.n_train_tasks):
            raise ValueError(f"screen_pool ({self.screen_pool}) picks n_train_tasks tasks per dataset out of a pool: "
                             f"it needs n_train_tasks > 0 and at most screen_pool, got {self.n_train_tasks}")
        if self.answer_temperature is not None and self.answer_temperature <= 0:
            raise ValueError(f"answer_temperature must be > 0 (or null: the temperature), got {self.answer_temperature}")
        if not 0.0 <= self.non_answer_weight <= 1.0:
            raise ValueError(f"non_answer_weight must be in [0, 1] (1: plain GRPO), got {self.non_answer_weight}")
        if self.answer_credit not in ANSWER_CREDITS:
            raise ValueError(f"answer_credit must be one of {ANSWER_CREDITS}, got {self.answer_credit!r}")
        if self.relabel_each_rollout and not self.relabel_candidates:
            raise ValueError("relabel_each_rollout needs relabel_candidates: true (it picks whose order is fresh)")
        if self.screen_pool and self.screen_rollouts < 2:
            raise ValueError("screen_rollouts must be >= 2: a task's reward spread needs two rollouts")
        self._check_processes()
        check_task_pool(self.task_pool)
        if self.conversation not in CONVERSATIONS:
            raise ValueError(f"conversation must be one of {CONVERSATIONS}, got {self.conversation!r}")


def load_rl_recipe(name_or_path: str | os.PathLike | RLRecipe) -> RLRecipe:
    """An RL recipe by name (``smoke``, ``demo``, ``full``) or from a ``.yaml``/``.json`` file."""
    if isinstance(name_or_path, RLRecipe):
        return name_or_path
    return RLRecipe.from_dict(read_recipe_file(recipe_path(name_or_path, "rl"), "rl"))


def check_task_pool(task_pool: str) -> None:
    """Refuse a task pool other than :data:`TASK_POOLS`."""
    if task_pool not in TASK_POOLS:
        raise ValueError(f"task_pool must be one of {TASK_POOLS}, got {task_pool!r}")
