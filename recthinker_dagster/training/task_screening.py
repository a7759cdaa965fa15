"""Which train tasks GRPO learns from: the start policy's sampled rollouts on a pool of tasks.

    selection = screen_tasks(pool, toolbox_factory, "assets/base_model", ["assets/sft_model/adapter"], recipe)
    selection.tasks       # recipe.n_train_tasks per dataset: the ones whose rewards varied most
    selection.report      # per pool task: its rollouts' rewards, their mean and spread, chosen or not

GRPO learns only from a group whose rewards differ: the advantage of every rollout of an
all-equal group is 0. The SFT policy already solves most train tasks (most of them have a
teacher trajectory in its training set), so their groups are flat or differ by noise, and a
policy that is confidently wrong is flat too. The screening samples ``recipe.screen_rollouts``
rollouts per task of the pool (the first ``recipe.screen_pool`` train tasks per dataset) with
the start policy, the recipe's temperature and budgets, scores them with the recipe's reward
and keeps, per dataset, the ``n_train_tasks`` tasks with the largest reward spread (the tasks
the policy gets partly right), in pool order. Ties go to the earlier task.

The screening rollouts are never trained on and never counted in the run's reward curve: the
run's first steps sample afresh, so picking tasks on a spread says nothing about the rewards of
the first and the last quarter it is judged by.

The screening also tells whether the recipe's budgets leave the start policy its own answer: when
fewer than half of its rollouts answer on their own, the loop forced the rest (tool calls or turns
spent), and GRPO would train on forced answers. The stage then warns (``budget_warning``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from recthinker_dagster.training.rewards import RolloutOutcome, weighted_reward
from recthinker_dagster.training.rl_recipes import RLRecipe

SCREEN_SEED_OFFSET = 7919  # the screening samples a stream of its own, not the first step's
MIN_OWN_ANSWER_SHARE = 0.5  # below it, the budgets (not the policy) end most rollouts


@dataclass
class TaskSelection:
    tasks: list  # the chosen AgentTasks, in pool order
    report: list[dict]  # per pool task: task_id, dataset, rewards, mean, std, chosen
    seconds: float = 0.0
    own_answer_share: float | None = None  # of all screening rollouts: answered on their own, not forced

    def chosen_ids(self) -> list[str]:
        return [task.task_id for task in self.tasks]


def screen_tasks(pool: Sequence, toolbox_factory: Callable, base_model_dir: str | os.PathLike, adapter_dirs,
                 recipe: RLRecipe, *, answer_mode: str = "generate",
                 log: Callable[[str], None] = print) -> TaskSelection:
    """Sample the start policy (base model plus ``adapter_dirs``) on every pool task and choose
    the recipe's ``n_train_tasks`` per dataset with the largest reward spread (module docstring)."""
    from recthinker_dagster.agent import run_agent
    from recthinker_dagster.agent.backends.transformers_backend import TransformersBackend
    from recthinker_dagster.models.loading import load_agent_model
    from recthinker_dagster.training.grpo import rollout_agent

    started = time.perf_counter()
    config, factory = rollout_agent(recipe, toolbox_factory, answer_mode)
    config = replace(config, producer="screening", sampling=replace(
        config.sampling, temperature=recipe.temperature, top_p=recipe.top_p, seed=recipe.seed + SCREEN_SEED_OFFSET))
    model, tokenizer = load_agent_model(base_model_dir, adapter_dirs, dtype="auto", device="auto")
    backend = TransformersBackend(model, tokenizer, name="screening", batch_size=recipe.rollout_batch_size)
    repeated = [task for task in pool for _ in range(recipe.screen_rollouts)]
    log(f"screening {len(pool)} train tasks with the start policy: {recipe.screen_rollouts} sampled rollouts each "
        f"at temperature {recipe.temperature}, {len(repeated)} in all")
    trajectories = run_agent(repeated, backend, factory, config, on_step=lambda turn, active: log(
        f"screening: turn {turn + 1}, {active} of {len(repeated)} conversations still going"))
    rewards: dict[str, list[float]] = {}
    answered = []
    for trajectory in trajectories:
        outcome = RolloutOutcome.from_trajectory(trajectory, config.max_tool_calls)
        rewards.setdefault(trajectory.task_id, []).append(
            round(weighted_reward(outcome, recipe.reward_weights, recipe.reward_params), 4))
        answered.append(outcome.answered)
    selection = choose_varied(pool, rewards, recipe.n_train_tasks)
    selection.seconds = round(time.perf_counter() - started, 1)
    selection.own_answer_share = round(sum(answered) / len(answered), 4)
    warning = budget_warning(selection.own_answer_share, recipe)
    if warning:
        log(warning)
    for dataset in dict.fromkeys(task.dataset for task in pool):
        rows = [row for row in selection.report if row["dataset"] == dataset]
        log(f"screening {dataset}: reward spread per task {[row['std'] for row in rows]}; chose "
            f"{[row['task_id'] for row in rows if row['chosen']]}")
    return selection


def budget_warning(own_answer_share: float, recipe: RLRecipe) -> str | None:
    """A warning when fewer than ``MIN_OWN_ANSWER_SHARE`` of the start policy's screening rollouts
    answered on their own: the recipe's turn and tool budgets then force most answers."""
    if own_answer_share >= MIN_OWN_ANSWER_SHARE:
        return None
    return (f"WARNING: only {own_answer_share:.0%} of the start policy's screening rollouts answered on their own; "
            f"the loop forced the rest when RL recipe {recipe.name!r} v{recipe.version}'s budgets ran out "
            f"(max_turns {recipe.max_turns}, max_tool_calls {recipe.max_tool_calls}), so GRPO would train on "
            "forced answers. Give the policy more turns or tool calls than it makes.")


def choose_varied(pool: Sequence, rewards: dict[str, list[float]], per_dataset: int) -> TaskSelection:
    """Per dataset, the ``per_dataset`` pool tasks whose ``rewards`` (task id -> the rollouts'
    rewards) have the largest population standard deviation, earlier tasks winning ties; the
    chosen keep their pool order. ``per_dataset`` <= 0: every task."""
    report = []
    for index, task in enumerate(pool):
        values = rewards[task.task_id]
        report.append({"task_id": task.task_id, "dataset": task.dataset, "rewards": values,
                       "mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4),
                       "index": index})
    chosen: set[int] = set()
    for dataset in dict.fromkeys(row["dataset"] for row in report):
        rows = sorted((row for row in report if row["dataset"] == dataset), key=lambda row: (-row["std"], row["index"]))
        chosen.update(row["index"] for row in (rows[:per_dataset] if per_dataset > 0 else rows))
    for row in report:
        row["chosen"] = row.pop("index") in chosen
    return TaskSelection([task for index, task in enumerate(pool) if index in chosen], report)
