"""GRPO over multi-turn, tool-using rollouts: TRL's ``GRPOTrainer`` with a rollout function.

    result = train_grpo(tasks, toolbox_factory, "assets/base_model", ["assets/sft_model/adapter"],
                        "runs/rl", load_rl_recipe("smoke"))

Policy. The SFT adapter(s) are merged into the base model and a fresh LoRA adapter is trained
on top, so the frozen weights are the SFT policy (the KL reference when ``beta > 0``) and the
RL adapter is small. ``load_agent_model(base, [sft_adapter, rl_adapter])`` rebuilds the policy.

Rollouts (:class:`ToolRollout`). Each dataset row is one train task's opening messages. TRL
hands the rollout function the prompts of a generation batch (each task repeated
``num_generations`` times); it runs the real agent loop (``run_agent``) on them, batched, with
the policy being trained behind a :class:`TransformersBackend` (sampling at the recipe's
temperature; a fresh backend per call, so its KV caches never outlive the weights they were
computed with: the shared prefix once per batch, each conversation's own KV across its turns)
and every tool call executed by the task's real toolbox.

Trained tokens are the sampled tokens. The loop keeps each conversation as its exact token
transcript (``agent/transcript.py``): every later turn's prompt is the previous prompt plus the
ids the policy sampled plus the template's tokens for what followed (tool results, nudges, the
next assistant header), checked to extend it on every turn. ``prompt_ids`` is the first
generation prompt, ``completion_ids`` the rest up to the policy's last token, and ``env_mask``
is 1 exactly on the sampled ids (stop tokens included) and 0 on the template's tokens, so TRL's
loss never trains on tool output or on text the policy did not write. ``logprobs`` are the
sampler's; ``rollout/sampler_logprob_gap`` compares them with the trainer's on a few rollouts
per step. The rewards get each rollout's :class:`RolloutOutcome` (see ``rewards.py``).

Answers (``answer_mode``): rollouts decode every ``<answer>`` under the label constraint (a
permutation by construction; the policy still samples the order). The trainer scores those
answer tokens under the same constraint (``grpo_trainer.py``): the rollout replays the
constraint over each sampled turn and hands the trainer the allowed ids per position, so a
label's log-prob is taken among the labels still allowed (as it was sampled) and a forced
token (``,``, ``</answer>``) trains nothing. In ``logits`` mode the policy draws the whole ranking
from the label head's scores at the answer's first position, label by label without
replacement (Plackett-Luce, ``AnswerState.head_draw``); the ranking reward is the NDCG of that
ranking. The replay forces every answer token and hands the trainer each label's draw, which
it scores from that one position (``answer_logprobs.head_draw_logprobs``): the gradient reaches
the head's scores there and the tokens before it.
The forced head's answer after an unanswered final request was never sampled and is not
trained (``TokenTranscript.trained_mask``).

Health figures logged per step (TRL's own plus these): ``tools/call_frequency``,
``tools/failure_rate``, ``rollout/valid_rate``, ``rollout/ndcg@10``, ``rollout/turns``,
``rollout/sampler_logprob_gap`` and ``rollout/sampler_logprob_abs_gap``,
``time/generation_s``, ``time/tools_s``. A run without a KL term (``beta: 0``) has no reference
pass, so TRL logs no ``kl``; there ``kl`` is estimated on the gap's rollouts instead (TRL's
estimator, against the adapter disabled). ``metrics.json`` adds seconds per step and their split
into rollout (generation + tools) and the rest (log-probs, loss, backward, optimizer).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recthinker_dagster.agent import prompts as agent_prompts
from recthinker_dagster.agent.backends.base import SamplingParams, constrains_answers
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.think import think_config, without_tools
from recthinker_dagster.models.loading import adapter_list, load_agent_model
from recthinker_dagster.training.data import IGNORE_INDEX, tokenize_conversation, training_chat_template
from recthinker_dagster.training.device import (
    data_parallel_arguments,
    is_main_process,
    resolve_precision,
    training_device,
    world_size,
)
from recthinker_dagster.training.merged_sampling import merged_adapter
from recthinker_dagster.training.rewards import RolloutOutcome, trl_reward_functions
from recthinker_dagster.training.rl_recipes import RLRecipe, load_rl_recipe

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.json"


@dataclass
class RLResult:
    output_dir: Path
    adapter_dir: Path
    metrics: dict
    global_step: int
    resumed_from: str | None


# -- rollouts ------------------------------------------------------------------------------------


class _TimedToolbox:
    """A toolbox that adds the wall time of its calls to a shared clock."""

    def __init__(self, toolbox, clock: list[float]):
        self._toolbox, self._clock = toolbox, clock

    def __getattr__(self, name):
        return getattr(self._toolbox, name)

    def call(self, name, arguments):
        started = time.perf_counter()
        try:
            return self._toolbox.call(name, arguments)
        finally:
            self._clock[0] += time.perf_counter() - started


def opening_messages(task, toolbox, config: AgentConfig) -> list[dict]:
    """The system and user messages the loop starts this task with."""
    return agent_prompts.initial_messages(
        task.history_lines, toolbox.candidate_lines(), user_id=task.user_id,
        max_turns=config.max_turns, max_tool_calls=config.max_tool_calls, template=config.system_prompt,
        labels=list(toolbox.labels),
    )


def split_conversation(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None,
                       chat_template: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, completion_ids, env_mask) of a finished conversation re-rendered through the
    training template: the prompt ends before the first assistant token; env_mask is 1 on
    assistant tokens, 0 on everything else. Only for backends without exact tokens (a scripted
    policy in tests): re-rendered text is not what a model sampled (``agent/transcript.py``)."""
    row = tokenize_conversation(tokenizer, messages, tools, chat_template)
    ids, labels = row["input_ids"], row["labels"]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:  # no assistant token at all: an empty completion that trains nothing
        return ids, [tokenizer.eos_token_id], [0]
    first, last = trained[0], trained[-1]
    mask = [0 if label == IGNORE_INDEX else 1 for label in labels[first : last + 1]]
    return ids[:first], ids[first : last + 1], mask


class ToolRollout:
    """TRL ``rollout_func``: the real agent loop and tools over the policy being trained."""

    def __init__(self, tasks: Sequence, toolbox_factory: Callable, agent_config: AgentConfig, tokenizer, *,
                 batch_size: int = 8, seed: int = 0, backend_factory: Callable | None = None, gap_rollouts: int = 2,
                 relabel_candidates: bool = False, relabel_each_rollout: bool = False, merged_rollouts: bool = False):
        self.agent_config, self.tokenizer = agent_config, tokenizer
        # sample with the LoRA adapter merged into the weights (merged_sampling.py); train_grpo
        # refuses it with a generation server, which loads the adapter itself
        self.merged_rollouts = merged_rollouts
        self.relabel_candidates = relabel_candidates  # a fresh candidate order per step (``shown_task``)
        self.relabel_each_rollout = relabel_each_rollout  # ... and per rollout of the group
        self._shown_counts: tuple[int, Counter] = (-1, Counter())  # (step, task id -> rollouts shown so far)
        self.toolbox_factory, self.batch_size, self.seed = toolbox_factory, batch_size, seed
        self.backend_factory = backend_factory
        self.gap_rollouts = gap_rollouts  # rollouts per step whose sampler-trainer log-prob gap is measured
        self.chat_template = training_chat_template(tokenizer)
        self.by_prompt: dict[str, Any] = {}  # prompt text -> AgentTask
        self.rows: list[dict] = []
        self.labels: dict[str, tuple[str, ...]] = {}  # task id -> candidate labels, in candidate order
        for task in tasks:
            toolbox = toolbox_factory(task)
            messages = opening_messages(task, toolbox, agent_config)
            key = messages[-1]["content"]
            if key in self.by_prompt:
                raise ValueError(f"tasks {self.by_prompt[key].task_id} and {task.task_id} have the same prompt")
            self.by_prompt[key] = task
            self.labels[task.task_id] = tuple(toolbox.labels)
            self.rows.append({"prompt": messages})
        self.step_records: list[dict] = []  # one per call: timings and rollout figures
        self.task_visits: list[dict] = []  # per call and task: its rollouts' mean NDCG@10 (``task_visits``)
        self.last_trajectories: list = []

    @classmethod
    def for_recipe(cls, recipe: RLRecipe, tasks: Sequence, toolbox_factory: Callable, agent_config: AgentConfig,
                   tokenizer, **options) -> ToolRollout:
        """The rollouts ``recipe`` trains on (its decode batch, seed, candidate orders and
        merging); ``options``: the other keywords, or any of these overridden."""
        settings = {"batch_size": recipe.rollout_batch_size, "seed": recipe.seed,
                    "relabel_candidates": recipe.relabel_candidates,
                    "relabel_each_rollout": recipe.relabel_each_rollout, "merged_rollouts": recipe.merged_rollouts}
        return cls(tasks, toolbox_factory, agent_config, tokenizer, **{**settings, **options})

    def dataset_rows(self) -> list[dict]:
        return list(self.rows)

    def _backend(self, model):
        if self.backend_factory is not None:
            return self.backend_factory(model, self.tokenizer)
        from recthinker_dagster.agent.backends.transformers_backend import (
            TransformersBackend,
        )

        return TransformersBackend(model, self.tokenizer, name="policy", batch_size=self.batch_size)

    def __call__(self, prompts: list, trainer) -> dict:
        started = time.perf_counter()
        tasks = []
        for prompt in prompts:
            key = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            if key not in self.by_prompt:
                raise KeyError("a prompt that matches no RL task (was the dataset built by this ToolRollout?)")
            tasks.append(self.by_prompt[key])
        step = trainer.state.global_step
        accelerator = getattr(trainer, "accelerator", None)
        # each data-parallel process samples its own stream (a group can span processes)
        process = accelerator.process_index if accelerator is not None else 0
        tasks = [self.shown_task(task, step, self._next_rollout(step, task.task_id), process) for task in tasks]
        model = accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model
        was_training = model.training
        sampling = replace(  # the agent's token budget and answer temperature, the trainer's sampling
            self.agent_config.sampling,
            temperature=getattr(trainer.args, "temperature", 1.0), top_p=getattr(trainer.args, "top_p", 1.0) or 1.0,
            seed=self.seed + 1000 * step + 100 * process,
        )
        config = replace(self.agent_config, sampling=sampling, producer="policy")
        tool_clock = [0.0]
        backend = self._backend(model)
        try:
            with merged_adapter(model) if self.merged_rollouts else contextlib.nullcontext():
                trajectories = run_agent(tasks, backend, lambda t: _TimedToolbox(self.toolbox_factory(t), tool_clock),
                                         config)
        finally:
            model.train(was_training)
        rollout_seconds = time.perf_counter() - started
        prompt_ids, completion_ids, env_mask, logprobs, outcomes = [], [], [], [], []
        for trajectory in trajectories:
            p, c, m, lp = self.training_tokens(trajectory)
            prompt_ids.append(p)
            completion_ids.append(c)
            env_mask.append(m)
            logprobs.append(lp)
            outcomes.append(RolloutOutcome.from_trajectory(trajectory, config.max_tool_calls).to_dict())
        constraints, settled, draws = self.answer_replay(backend, config, tasks, completion_ids, env_mask)
        # a trainer that takes them (grpo_trainer.py) scores answer tokens as they were sampled, the
        # head's labels as they were drawn (logits mode), knows where each reward was settled, and
        # projects its LM head on the sampled tokens only
        for name, rows in (("receive_answer_constraints", constraints), ("receive_head_draws", draws),
                           ("receive_settled_positions", settled), ("receive_trained_masks", env_mask)):
            receive = getattr(trainer, name, None)
            if receive is not None:
                receive(rows)
        record = self._record(step, trajectories, rollout_seconds, tool_clock[0], env_mask)
        record["rollout/padding_share"] = padding_share(prompt_ids, completion_ids)
        # without a KL term TRL computes no reference log-probs and logs no ``kl``: estimate it here
        record.update(self._sampler_gap(model, prompt_ids, completion_ids, env_mask, logprobs, sampling,
                                        constraints, draws, estimate_kl=getattr(trainer, "beta", None) == 0))
        self.step_records.append(record)
        self.task_visits.extend(task_visits(step, trajectories))
        self.last_trajectories = trajectories
        metrics = getattr(trainer, "_metrics", None)
        if metrics is not None:  # TRL averages these into its per-step logs
            for name, value in record.items():
                if name != "step":
                    metrics["train"][name].append(value)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0 if math.isnan(v) else v for v in row] for row in logprobs],
                "env_mask": env_mask, "outcome": outcomes}

    def training_tokens(self, trajectory) -> tuple[list[int], list[int], list[int], list[float]]:
        """(prompt_ids, completion_ids, env_mask, sampler log-probs) to train on: the exact
        transcript (the first generation prompt; every sampled id with mask 1, the template's
        tokens between turns and the label head's unsampled answer with mask 0), or a
        re-rendering where the backend kept none."""
        if trajectory.transcript is not None:
            kept = trajectory.transcript.trimmed()
            return kept.prompt_ids, kept.completion_ids, kept.trained_mask(), kept.logprobs
        p, c, m = split_conversation(self.tokenizer, trajectory.messages, trajectory.tools, self.chat_template)
        return p, c, m, [math.nan] * len(c)

    def answer_replay(self, backend, config: AgentConfig, tasks, completion_ids,
                      masks) -> tuple[list | None, list | None, list | None]:
        """Per rollout and completion position, replayed over each sampled turn: the ids the answer
        constraint allowed there (None: free), whether the reward was already settled when the
        policy sampled it (an id after its answer placed the task's target: every reward term is
        fixed from there on, ``training/rewards.py``, the ranking and format terms by the target's
        rank, efficiency by the calls before the answer, so the rest of the answer cannot change
        the return), and the head draw of a logits-mode label (``HeadDraw``, its source a
        completion position; None elsewhere). (None, None, None) when answers were not decoded
        under the constraint (an HTTP backend, ``constrain_answers=False``)."""
        if not (config.constrain_answers and constrains_answers(backend) and hasattr(backend, "label_tokens")):
            return None, None, None
        from recthinker_dagster.agent.backends.constrained import TokenTexts, replay_answer

        decode = TokenTexts(self.tokenizer)
        allowed_rows, settled_rows, draw_rows = [], [], []
        for task, completion, mask in zip(tasks, completion_ids, masks):
            labels = self.labels[task.task_id]
            tokens, target = backend.label_tokens(labels), labels[task.candidate_item_ids.index(task.target_item_id)]
            allowed: list = [None] * len(completion)
            settled = [False] * len(completion)
            draws: list = [None] * len(completion)
            for start, end in _runs(mask):  # one run of sampled ids per assistant turn
                allowed[start:end], settled[start:end], turn_draws = replay_answer(
                    tokens, completion[start:end], decode, backend.stop_ids, target, config.answer_mode)
                draws[start:end] = [None if d is None else replace(d, source=start + d.source) for d in turn_draws]
            allowed_rows.append(allowed)
            settled_rows.append(settled)
            draw_rows.append(draws)
        return allowed_rows, settled_rows, draw_rows

    def _next_rollout(self, step: int, task_id: str) -> int:
        """The index of this task's next rollout in ``step`` (counted across calls of one step)."""
        if self._shown_counts[0] != step:
            self._shown_counts = (step, Counter())
        counts = self._shown_counts[1]
        counts[task_id] += 1
        return counts[task_id] - 1

    def shown_task(self, task, step: int, rollout: int = 0, process: int = 0):
        """The task as this step shows it to its ``rollout``-th rollout on data-parallel
        ``process``: with ``relabel_candidates``, its candidates in an order drawn from the seed,
        the step and the task, so the target's label changes between visits and the policy cannot
        learn a label (every train task's target under one letter) in place of the item. The order
        is the same for every rollout of the group, unless ``relabel_each_rollout``: then each
        rollout has its own, so within a group the target sits under several labels, and since the
        group's advantages sum to 0, a step's push on "rank this label first" cancels while the
        push on the item stays."""
        if not self.relabel_candidates:
            return task
        key = f"{self.seed}|{step}|{task.task_id}"
        if self.relabel_each_rollout:  # process 0 keeps the single-process run's orders
            key += f"|{rollout}" + (f"|p{process}" if process else "")
        return task.reordered(key)

    def _sampler_gap(self, model, prompt_ids, completion_ids, env_mask, logprobs, sampling: SamplingParams,
                     constraints=None, draws=None, estimate_kl: bool = False) -> dict:
        """The trainer's log-probs of the sampled tokens against the sampler's, on the first
        ``gap_rollouts`` rollouts (one forward pass each): mean and mean absolute difference.
        Answer tokens are scored among the ids their constraint allowed, as the trainer does.
        ``estimate_kl`` (a run without a KL term, where TRL logs none): also ``kl``, the policy's
        KL to its start (the adapter disabled) on the same tokens, by TRL's estimator
        ``exp(r - p) - (r - p) - 1``, at one more forward pass per rollout."""
        import torch

        rows = [k for k, row in enumerate(logprobs) if any(not math.isnan(v) for v in row)][: self.gap_rollouts]
        estimate_kl = estimate_kl and hasattr(model, "disable_adapter")  # the start is the adapter disabled
        diffs: list[float] = []
        kls: list[float] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for k in rows:
                    ids = torch.tensor([prompt_ids[k] + completion_ids[k]], device=model.device)
                    score = functools.partial(_trainer_logprobs, ids, len(prompt_ids[k]), sampling,
                                              constraints[k] if constraints is not None else None,
                                              draws[k] if draws is not None else None)
                    trained = score(model).tolist()
                    kept = [j for j, (sampled, m) in enumerate(zip(logprobs[k], env_mask[k]))
                            if m and not math.isnan(sampled)]
                    diffs += [logprobs[k][j] - trained[j] for j in kept]
                    if estimate_kl:
                        with model.disable_adapter():
                            start = score(model).tolist()
                        kls += [math.exp(start[j] - trained[j]) - (start[j] - trained[j]) - 1 for j in kept]
        finally:
            model.train(was_training)
        figures = {}
        if diffs:
            figures = {"rollout/sampler_logprob_gap": statistics.fmean(diffs),
                       "rollout/sampler_logprob_abs_gap": statistics.fmean(abs(d) for d in diffs)}
        if kls:
            figures["kl"] = statistics.fmean(kls)
        return figures

    @staticmethod
    def _record(step, trajectories, rollout_seconds, tool_seconds, env_mask) -> dict:
        n = max(len(trajectories), 1)
        calls = sum(t.n_tool_calls for t in trajectories)
        return {
            "step": step,
            "tools/call_frequency": calls / n,
            "tools/failure_rate": sum(t.n_invalid_calls for t in trajectories) / calls if calls else 0.0,
            "rollout/valid_rate": sum(t.valid for t in trajectories) / n,
            "rollout/answered_rate": sum(t.finish == "answer" for t in trajectories) / n,
            "rollout/forced_head_rate": sum(t.finish == "forced_head" for t in trajectories) / n,
            "rollout/ndcg@10": sum(t.metrics.get("ndcg@10", 0.0) for t in trajectories) / n,
            "rollout/turns": sum(t.n_turns for t in trajectories) / n,
            "rollout/count": len(trajectories),  # this process's rollouts of the step
            "rollout/policy_tokens": sum(sum(m) for m in env_mask) / n,
            "time/rollout_s": rollout_seconds,
            "time/tools_s": tool_seconds,
            "time/generation_s": rollout_seconds - tool_seconds,
        }


def padding_share(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> float:
    """The share of padding in TRL's layout of these rollouts (prompts padded to the longest
    prompt, completions to the longest completion): what every log-prob pass pays for unless the
    recipe trims it (``trim_padding``)."""
    if not prompt_ids:
        return 0.0
    width = max(map(len, prompt_ids)) + max(map(len, completion_ids))
    real = sum(map(len, prompt_ids)) + sum(map(len, completion_ids))
    return 1.0 - real / (width * len(prompt_ids)) if width else 0.0


def task_visits(step: int, trajectories: Sequence) -> list[dict]:
    """Per task of one step: how many rollouts, and their mean NDCG@10. Comparing a task's first
    and last visits pairs the rewards of the same task, which step means (each step draws other
    tasks, some easy, some hard) cannot."""
    by_task: dict[str, list[float]] = {}
    for trajectory in trajectories:
        by_task.setdefault(trajectory.task_id, []).append(float(trajectory.metrics.get("ndcg@10", 0.0)))
    return [{"step": step, "task_id": task_id, "rollouts": len(values), "ndcg@10": round(statistics.fmean(values), 4)}
            for task_id, values in by_task.items()]


def first_and_last_visits(visits: Sequence[Mapping]) -> dict:
    """Each task visited at least twice: its rollouts' mean NDCG@10 at the first and the last
    visit. The mean of the paired differences (last - first) with its standard error says
    whether the policy improved on the tasks it trained on."""
    by_task: dict[str, list[Mapping]] = {}
    for visit in sorted(visits, key=lambda v: v["step"]):
        by_task.setdefault(visit["task_id"], []).append(visit)
    pairs = [(seen[0]["ndcg@10"], seen[-1]["ndcg@10"]) for seen in by_task.values() if len(seen) > 1]
    if not pairs:
        return {"tasks": 0}
    difference, se = mean_and_se([last - first for first, last in pairs])
    return {"tasks": len(pairs), "first": round(statistics.fmean(f for f, _ in pairs), 4),
            "last": round(statistics.fmean(last for _, last in pairs), 4), "difference": difference, "se": se}


def mean_and_se(values: Sequence[float]) -> list[float | None]:
    """[mean, standard error], rounded; the error is None for a single value (JSON has no NaN)."""
    se = round(statistics.stdev(values) / math.sqrt(len(values)), 4) if len(values) > 1 else None
    return [round(statistics.fmean(values), 4), se]


def quarter_summary(values: Sequence[float]) -> dict:
    """Mean and standard error of the first and of the last quarter of ``values`` (a step series)."""
    n = max(1, len(values) // 4)
    return {"steps_per_quarter": n, "first_quarter": mean_and_se(values[:n]), "last_quarter": mean_and_se(values[-n:])}


def learning_summary(steps: Sequence[Mapping], visits: Sequence[Mapping]) -> dict:
    """Did the run learn? The reward's first and last quarter (mean, standard error), the mean
    ``frac_reward_zero_std`` (groups that taught nothing) and each train task's rollout NDCG@10
    at its first and its last visit (``first_and_last_visits``)."""
    rewards = [float(step["reward"]) for step in steps if step.get("reward") is not None]
    zero_std = [float(step["frac_reward_zero_std"]) for step in steps if step.get("frac_reward_zero_std") is not None]
    return {"reward": quarter_summary(rewards) if rewards else None,
            "mean_frac_reward_zero_std": round(statistics.fmean(zero_std), 4) if zero_std else None,
            "tasks_first_and_last_visit": first_and_last_visits(visits)}


# -- training -------------------------------------------------------------------------------------


def grpo_config(recipe: RLRecipe, checkpoint_dir: Path, precision: str, use_cpu: bool):
    """The TRL config of a recipe. Under a data-parallel launch each process accumulates (and
    samples the rollouts of) its share of the recipe's global batch."""
    from trl import GRPOConfig

    return GRPOConfig(
        **data_parallel_arguments(recipe.gradient_accumulation_steps, use_cpu),
        output_dir=str(checkpoint_dir),
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        max_grad_norm=recipe.max_grad_norm,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_turns * recipe.max_new_tokens,
        beta=recipe.beta,
        loss_type=recipe.loss_type,
        scale_rewards=recipe.scale_rewards,
        temperature=recipe.temperature,
        top_p=recipe.top_p,
        reward_weights=list(recipe.reward_weights.values()),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing=recipe.gradient_checkpointing,
        use_cpu=use_cpu,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=not use_cpu,
        log_completions=False,
        remove_unused_columns=False,
    )


def rollout_agent(recipe: RLRecipe, toolbox_factory: Callable, answer_mode: str = "generate"
                  ) -> tuple[AgentConfig, Callable]:
    """The agent settings and toolbox factory of the recipe's rollouts (greedy until the rollout
    sets its sampling temperature): the recipe's turn, call and token budgets, or for a ``think``
    conversation one tool-free turn of tagged reasoning, then the answer."""
    sampling = SamplingParams(max_new_tokens=recipe.max_new_tokens, answer_temperature=recipe.answer_temperature)
    if recipe.conversation == "think":
        return think_config(sampling, answer_mode=answer_mode), without_tools(toolbox_factory)
    return AgentConfig(max_turns=recipe.max_turns, max_tool_calls=recipe.max_tool_calls, sampling=sampling,
                       answer_mode=answer_mode), toolbox_factory


def load_policy_start(base_model_dir, adapter_dirs, precision: str):
    """The base model with the given (SFT) adapters merged in: the frozen start of RL."""
    model, _ = load_agent_model(base_model_dir, adapter_dirs, dtype="bfloat16" if precision == "bf16" else "float32",
                                device="cpu")
    return model


def train_grpo(
    tasks: Sequence,
    toolbox_factory: Callable,
    base_model_dir: str | os.PathLike,
    sft_adapter_dirs,
    output_dir: str | os.PathLike,
    recipe: RLRecipe | str,
    *,
    resume: bool = True,
    callbacks: Sequence | None = None,
    extra_reward_funcs: Sequence[Callable] = (),
    backend_factory: Callable | None = None,
    answer_mode: str = "generate",
) -> RLResult:
    """Train an RL LoRA adapter with GRPO on ``tasks`` (AgentTasks of train tasks; see the module
    docstring). ``resume=True`` continues from ``output_dir/checkpoints``. ``extra_reward_funcs``
    are raw TRL reward functions added with weight 1 (for experiments). ``answer_mode``:
    ``generate`` or ``logits`` (the ranking reward then scores the label head's ranking).
    ``backend_factory(model, tokenizer)`` gives each step's rollout backend: in-process by default,
    a generation server with ``training.policy_server.PolicyServer``."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )
    from recthinker_dagster.training.callbacks import StepClock
    from recthinker_dagster.training.grpo_trainer import ConstrainedAnswerGRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    recipe = load_rl_recipe(recipe)
    prompts_per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps // recipe.num_generations
    if len(tasks) < prompts_per_step:  # TRL would stop at step 0 without a word
        raise ValueError(f"RL recipe {recipe.name!r} takes {prompts_per_step} tasks per step (per_device_train_batch_size "
                         f"x gradient_accumulation_steps / num_generations), but there are only {len(tasks)} train "
                         "tasks: raise n_train_tasks or lower gradient_accumulation_steps")
    if recipe.merged_rollouts and backend_factory is not None:
        raise ValueError(f"RL recipe {recipe.name!r} sets merged_rollouts, which merges the adapter for in-process "
                         "rollouts; a generation server loads the adapter itself: unset merged_rollouts")
    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / CHECKPOINTS
    set_seed(recipe.seed)
    device = training_device(recipe.device, recipe.num_threads)
    precision = resolve_precision(recipe.precision, device)
    adapters = adapter_list(sft_adapter_dirs)
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(adapters[-1] if adapters else base_model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_policy_start(base_model_dir, adapters, precision)

    agent_config, toolbox_factory = rollout_agent(recipe, toolbox_factory, answer_mode)
    rollout = ToolRollout.for_recipe(recipe, tasks, toolbox_factory, agent_config, tokenizer,
                                     backend_factory=backend_factory)
    from datasets import Dataset

    reward_funcs = trl_reward_functions(recipe.reward_weights, recipe.reward_params) + list(extra_reward_funcs)
    args = grpo_config(recipe, checkpoint_dir, precision, use_cpu=device.type == "cpu")
    if extra_reward_funcs:
        args.reward_weights = list(args.reward_weights) + [1.0] * len(extra_reward_funcs)
    clock = StepClock()
    trainer = ConstrainedAnswerGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rollout.dataset_rows()),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                               target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM"),
        rollout_func=rollout,
        callbacks=[clock, *(callbacks or [])],
        answer_temperature=recipe.answer_temperature,
        non_answer_weight=recipe.non_answer_weight,
        answer_credit=recipe.answer_credit,
        trim_padding=recipe.trim_padding,
        shared_prompts=recipe.shared_prompts,
    )
    if not resume and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:
        close = getattr(backend_factory, "close", None)
        if close is not None:  # a generation server: unload the last step's adapter
            close()
    train_seconds = time.perf_counter() - started

    adapter_dir = output_dir / ADAPTER
    metrics = _run_metrics(trainer, clock, rollout, recipe, precision, device, train_seconds, last, len(tasks))
    if is_main_process():  # data-parallel processes hold the same weights: the first one saves
        trainer.model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        (output_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    return RLResult(output_dir, adapter_dir, metrics, trainer.state.global_step, Path(last).name if last else None)


HEALTH_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "learning_rate", "grad_norm", "loss",
               "completions/mean_length", "completions/clipped_ratio", "tools/call_frequency", "tools/failure_rate",
               "rollout/valid_rate", "rollout/answered_rate", "rollout/forced_head_rate", "rollout/ndcg@10",
               "rollout/turns",
               "rollout/policy_tokens", "rollout/padding_share", "completions/max_length",
               "rollout/sampler_logprob_gap", "rollout/sampler_logprob_abs_gap",
               "time/rollout_s", "time/generation_s", "time/tools_s")


def _run_metrics(trainer, clock, rollout, recipe, precision, device, train_seconds, resumed_from, n_tasks) -> dict:
    steps = []
    for entry in trainer.state.log_history:
        if "reward" not in entry:
            continue
        row = {"step": entry["step"]}
        row.update({k: entry[k] for k in HEALTH_KEYS if k in entry})
        row.update({k: v for k, v in entry.items() if k.startswith("rewards/")})
        steps.append(row)
    step_seconds = clock.step_seconds
    rollout_seconds = [r["time/rollout_s"] for r in rollout.step_records]
    tool_seconds = [r["time/tools_s"] for r in rollout.step_records]

    def mean(values):
        return round(statistics.fmean(values), 3) if values else None

    seconds_per_step = mean(step_seconds)
    rollout_per_step = (sum(rollout_seconds) / len(step_seconds)) if step_seconds else None
    tools_per_step = (sum(tool_seconds) / len(step_seconds)) if step_seconds else None
    return {
        "recipe": recipe.name,
        "recipe_version": recipe.version,
        "recipe_digest": recipe.digest,
        "recipe_config": recipe.to_dict(),
        "precision": precision,
        "device": str(device),
        "n_tasks": n_tasks,
        "global_step": trainer.state.global_step,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "steps_this_run": len(step_seconds),
        "steps": steps,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": seconds_per_step,
        "step_seconds": [round(s, 3) for s in step_seconds],
        "time_split_per_step": {
            "generation_s": _round(rollout_per_step - tools_per_step) if rollout_per_step is not None else None,
            "tools_s": _round(tools_per_step),
            "scoring_backward_optimizer_s": _round(seconds_per_step - rollout_per_step)
            if seconds_per_step is not None and rollout_per_step is not None else None,
        },
        "final_reward": steps[-1].get("reward") if steps else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "answer_mode": rollout.agent_config.answer_mode,
        "num_processes": world_size(),
        "rollouts_per_process": rollout.step_records[-1]["rollout/count"] if rollout.step_records else None,
        "task_visits": rollout.task_visits,
        "learning": learning_summary(steps, rollout.task_visits),
    }


def _trainer_logprobs(ids, prompt_length: int, sampling: SamplingParams, constraints, draws, model):
    """The trainer's log-probs of the completion of ``ids`` (one ``(1, length)`` row whose first
    ``prompt_length`` ids are the prompt) under ``model``, at the sampling temperature: answer
    tokens among the ids their constraint allowed, the head's draws as drawn (logits mode)."""
    import torch

    from recthinker_dagster.training.answer_logprobs import (
        FREE,
        allowed_table,
        constrained_positions,
        drawn_label_log_prob,
        head_draw_tables,
        log_prob_among,
    )

    raw = model(input_ids=ids).logits[0, prompt_length - 1 : -1].float()
    logits = raw / (sampling.temperature if sampling.temperature > 0 else 1.0)
    completion = ids[0, prompt_length:]
    trained = torch.log_softmax(logits, dim=-1).gather(1, completion[:, None])[:, 0]
    if constraints is not None:
        allowed = allowed_table([constraints], len(completion))[0]
        at = constrained_positions(allowed[None])[1]
        if at.numel():
            scores = logits[at].gather(1, allowed[at].clamp(min=0)) * sampling.answer_scale
            trained[at] = log_prob_among(scores, allowed[at], completion[at])
    if draws is not None:
        source, groups = (table[0] for table in head_draw_tables([draws], len(completion)))
        at = (source != FREE).nonzero(as_tuple=True)[0]
        if at.numel():
            ids_at = groups[at]
            scores = raw[source[at]][torch.arange(at.numel())[:, None, None], ids_at.clamp(min=0)]
            trained[at] = drawn_label_log_prob(scores, ids_at, sampling.temperature / sampling.answer_scale)
    return trained


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of every run of 1s."""
    runs, start = [], None
    for k, m in enumerate([*mask, 0]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _round(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 3)
