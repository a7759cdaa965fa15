"""The ``rl_model`` stage: GRPO on top of the published SFT policy, over real tool-using rollouts.

    result = build_rl_model_stage(RLSettings(recipe="smoke"), layout, ["ml-1m"], log=print)
    result.artifact.folder       # assets/rl_model: adapter/, metrics.json, validation.json, lineage.json

Train tasks of every dataset (a fixed, group-balanced sample of the recipe's ``n_train_tasks``
each, from its ``task_pool``: every train task, or the ones SFT never imitated) are the prompts;
the rollouts run the real agent loop and tools. The run works in ``.work/rl_model/<fingerprint>/``
(recipe, SFT adapter version and datasets), so an interrupted run resumes from its last checkpoint.
After training the SFT policy and the SFT+RL policy are scored on the same validation slice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_lineage, read_table, tracked_md5
from recthinker_dagster.settings import RLSettings
from recthinker_dagster.stages.filtering import ASSET as FILTERED_TRAJECTORIES
from recthinker_dagster.stages.filtering import DECISIONS, kept_rows
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.stages.validation import (
    saved_report,
    validate_policies,
    validation_document,
    validation_metrics,
    validation_suites,
    validation_table,
)
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.rl_recipes import RLRecipe, check_task_pool, load_rl_recipe
from recthinker_dagster.training.validation import paired_difference, validation_slice

ASSET = "rl_model"
SCREENING = "screening.json"
LOGGED_METRICS = ("train_seconds", "seconds_per_step", "global_step", "final_reward", "n_tasks", "trainable_parameters")
HEALTH_IN_PROGRESS = ("frac_reward_zero_std", "rewards/ranking/mean", "tools/call_frequency", "rollout/valid_rate")
SERIES = ("reward", "reward_std", "frac_reward_zero_std", "kl", "learning_rate", "completions/mean_length",
          "tools/call_frequency", "tools/failure_rate", "rollout/valid_rate", "rollout/ndcg@10")


@dataclass
class RLModelResult:
    artifact: StageArtifact
    metrics: dict  # the GRPO run's metrics.json
    validation: dict  # {policy: evaluate_policy report}
    global_step: int
    resumed_from: str | None


@dataclass(frozen=True)
class PolicyLineage:
    """The policy RL starts from: its base model folder and its adapter folder (None: the base model)."""

    base_model: Path
    sft_adapter: Path | None

    @property
    def adapters(self) -> list[Path]:
        return [self.sft_adapter] if self.sft_adapter is not None else []


class DatasetToolboxes:
    """A toolbox factory over several datasets: each task goes to its own dataset's tools."""

    def __init__(self, factories: Mapping[str, Callable]):
        self.factories = dict(factories)

    def __call__(self, task):
        return self.factories[task.dataset](task)


def policy_lineage(layout: ArtifactLayout, start: str | None = "sft_model") -> PolicyLineage:
    """Where the published SFT policy ``start`` has its base model and adapter (from its
    ``lineage.json``); ``start=None``: the published base model itself (RecZero)."""
    if start is None:
        return PolicyLineage(layout.asset_dir("base_model"), None)
    lineage = read_lineage(layout, start)
    return PolicyLineage(layout.resolve(lineage["base_model"]), layout.asset_dir(start) / "adapter")


def rl_recipe(settings: RLSettings) -> RLRecipe:
    recipe = load_rl_recipe(settings.recipe)
    return recipe.with_overrides(max_steps=settings.max_steps) if settings.max_steps is not None else recipe


def check_recipe_fits_run(recipe: RLRecipe, settings: RLSettings) -> None:
    """Refuse a recipe whose answer options need the local backend's answer constraint in a run
    that samples elsewhere (a rollout server: free text)."""
    if settings.rollout_server and recipe.answer_temperature is not None:
        raise ValueError(f"RL recipe {recipe.name!r} sets answer_temperature, which needs the local backend's answer "
                         "constraint; a rollout server samples free text. Drop rollout_server or answer_temperature.")
    weighted = " and ".join(name for name, value in (("non_answer_weight", recipe.non_answer_weight != 1.0),
                                                     ("answer_credit", recipe.answer_credit != "all")) if value)
    if weighted and settings.rollout_server:
        raise ValueError(f"RL recipe {recipe.name!r} sets {weighted}, which needs the answer's labels as the "
                         "local backend's answer constraint marks them; this run samples on rollout_server "
                         f"{settings.rollout_server!r}. Drop {weighted} or rollout_server.")


def rl_tasks(layout: ArtifactLayout, datasets: Sequence[str], n_train_tasks: int,
             prompt_history_len: int, task_ids: Sequence[str] | None = None,
             task_pool: str = "train") -> tuple[list, DatasetToolboxes]:
    """The RL prompts (a group-balanced slice of every dataset's train tasks in ``task_pool``, or
    of those only the ones in ``task_ids``: the screening's choice) and their toolboxes.
    ``task_pool`` "train": every train task; "unimitated": the train tasks none of whose teacher
    trajectories passed the quality filter, so the SFT policy never imitated a solution."""
    check_task_pool(task_pool)
    imitated = imitated_task_ids(layout) if task_pool == "unimitated" else set()
    tasks, factories = [], {}
    for dataset in datasets:
        frame = read_table(layout, "task_splits", dataset, "tasks_train.parquet")
        if imitated:
            frame = frame.filter(~pl.col("task_id").is_in(list(imitated)))
            if frame.is_empty():
                raise ValueError(f"every train task of {dataset} has a kept teacher trajectory: the "
                                 "'unimitated' RL task pool is empty there; use task_pool: train")
        frame = validation_slice(frame, n_train_tasks)
        indexes = load_tool_indexes(layout, dataset)
        tasks.extend(agent_tasks(frame, indexes, prompt_history_len))
        factories[dataset] = Toolboxes(indexes)
    if task_ids is not None:
        scope = f"the first {n_train_tasks} {task_pool} tasks" if n_train_tasks > 0 else f"the {task_pool} tasks"
        tasks = only_tasks(tasks, task_ids, f"{scope} of {list(datasets)}")
    return tasks, DatasetToolboxes(factories)


def imitated_task_ids(layout: ArtifactLayout) -> set[str]:
    """The train tasks with at least one teacher trajectory kept for SFT (the published
    ``filtered_trajectories``' decisions)."""
    folder = layout.asset_dir(FILTERED_TRAJECTORIES)
    decisions = folder / DECISIONS
    if not decisions.is_file():
        raise FileNotFoundError(f"the 'unimitated' RL task pool reads the quality filter's decisions, and "
                                f"{layout.relative(decisions)} is missing: materialize {FILTERED_TRAJECTORIES} first")
    return set(kept_rows(folder)["task_id"].to_list())


def only_tasks(tasks: Sequence, task_ids: Sequence[str], where: str) -> list:
    """The tasks whose ids are in ``task_ids``, in their order; an error names any id not among them."""
    wanted = set(task_ids)
    missing = wanted - {task.task_id for task in tasks}
    if missing:
        raise ValueError(f"RL tasks {sorted(missing)} are not among {where}: were the task splits rebuilt since "
                         "they were chosen?")
    return [task for task in tasks if task.task_id in wanted]


def rl_tasks_at(root: str, datasets: Sequence[str], n_train_tasks: int, prompt_history_len: int,
                data_dir: str | None = None, cache_dir: str | None = None,
                task_ids: Sequence[str] | None = None, task_pool: str = "train") -> tuple[list, DatasetToolboxes]:
    """``rl_tasks`` of the project at ``root``: what every data-parallel GRPO process rebuilds."""
    layout = ArtifactLayout(Path(root), Path(data_dir) if data_dir else None, Path(cache_dir) if cache_dir else None)
    return rl_tasks(layout, datasets, n_train_tasks, prompt_history_len, task_ids, task_pool)


@dataclass
class RunRollouts:
    """A finished GRPO run's rollouts, rebuilt to sample policies as that run did (its recipe with
    every override, tasks, agent budgets, tokenizer and precision): ``run_rollouts``."""

    recipe: RLRecipe
    tasks: list
    agent_config: object
    toolbox_factory: Callable
    tokenizer: object
    precision: str

    def rollout(self, **options):
        """The run's ``training.grpo.ToolRollout`` (``ToolRollout.for_recipe``; ``options`` as there)."""
        from recthinker_dagster.training.grpo import ToolRollout

        return ToolRollout.for_recipe(self.recipe, self.tasks, self.toolbox_factory, self.agent_config,
                                      self.tokenizer, **options)


def run_rollouts(layout: ArtifactLayout, run) -> RunRollouts:
    """``run``: a ``training.resampling.GRPORun`` (``read_grpo_run``) of the project at ``layout``."""
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template
    from recthinker_dagster.training.device import resolve_precision, training_device
    from recthinker_dagster.training.grpo import rollout_agent

    recipe = RLRecipe.from_dict(run.recipe)
    datasets = sorted({task_id.split("/")[0] for task_id in run.task_ids})
    # n_train_tasks 0: look the run's tasks up among all of the pool's
    tasks, toolboxes = rl_tasks(layout, datasets, 0, run.prompt_history_len, run.task_ids, recipe.task_pool)
    start = run.start_adapters
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(start[-1] if start else
                                                                        layout.asset_dir("base_model")))
    agent_config, toolbox_factory = rollout_agent(recipe, toolboxes, run.answer_mode)
    precision = resolve_precision(recipe.precision, training_device(recipe.device, recipe.num_threads))
    return RunRollouts(recipe, tasks, agent_config, toolbox_factory, tokenizer, precision)


def screened_tasks(pool: list, toolboxes: DatasetToolboxes, policy: PolicyLineage, recipe: RLRecipe,
                   answer_mode: str, work_dir: Path, log: Callable[[str], None], *, resume: bool = True) -> dict:
    """The screening's choice among ``pool`` (``training/task_screening.py``), kept in the run's
    work folder so that a resumed run trains on the tasks it started with, without screening again."""
    saved = work_dir / SCREENING
    if resume and saved.is_file():
        screening = json.loads(saved.read_text())
        log(f"screening: resuming with the tasks chosen before, {screening['chosen']}")
        return screening
    from recthinker_dagster.training.task_screening import screen_tasks

    selection = screen_tasks(pool, toolboxes, policy.base_model, policy.adapters, recipe, answer_mode=answer_mode,
                             log=log)
    screening = {"pool_per_dataset": recipe.screen_pool, "rollouts_per_task": recipe.screen_rollouts,
                 "seconds": selection.seconds, "own_answer_share": selection.own_answer_share,
                 "chosen": selection.chosen_ids(), "tasks": selection.report}
    work_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(screening, indent=2))
    return screening


def build_rl_model_stage(settings: RLSettings, layout: ArtifactLayout, datasets: Sequence[str],
                         log: Callable[[str], None] = print, *, asset: str = ASSET,
                         start: str | None = "sft_model") -> RLModelResult:
    """Train (or resume) the RL adapter on the ``start`` policy (an SFT asset; None: the base
    model), validate the start and the trained policy, write ``assets/<asset>``. The recipe's
    ``conversation`` decides the rollouts and the validation (``think``: RecZero, RecOne)."""
    from recthinker_dagster.training.callbacks import LogProgress
    from recthinker_dagster.training.distributed import TaskSource, launch_grpo
    from recthinker_dagster.training.grpo import train_grpo
    from recthinker_dagster.training.policy_server import policy_server

    recipe = rl_recipe(settings)
    check_recipe_fits_run(recipe, settings)
    policy = policy_lineage(layout, start)
    start_name = start or "base_model"
    sft_md5 = tracked_md5(layout.asset_dir(start_name)) or "untracked"
    validation_settings = replace(settings.validation, conversation=recipe.conversation)
    # the prompts show as much history as the validation (and the evaluation) prompts
    history_len = settings.validation.prompt_history_len
    tasks, toolboxes = rl_tasks(layout, datasets, recipe.screen_pool or recipe.n_train_tasks, history_len,
                                task_pool=recipe.task_pool)
    mode = "" if settings.answer_mode == "generate" else f"|{settings.answer_mode}"  # a logits run never resumes a generate one
    fingerprint = hashlib.sha256(f"{recipe.digest}|{sft_md5}|{','.join(datasets)}{mode}".encode()).hexdigest()[:16]
    work_dir = layout.work_dir(asset, fingerprint)
    screening = None
    if recipe.screen_pool:
        screening = screened_tasks(tasks, toolboxes, policy, recipe, settings.answer_mode, work_dir, log,
                                   resume=settings.resume)
        tasks = only_tasks(tasks, screening["chosen"], "the screening's pool")
    log(f"GRPO recipe {recipe.name} v{recipe.version} ({recipe.digest}) on {len(tasks)} train tasks, "
        f"{recipe.num_generations} rollouts each per step, in {layout.relative(work_dir)}")
    if recipe.num_processes > 1:
        source = TaskSource(f"{__name__}:rl_tasks_at", {
            "root": str(layout.root), "datasets": list(datasets),
            "n_train_tasks": recipe.screen_pool or recipe.n_train_tasks, "prompt_history_len": history_len,
            "data_dir": str(layout.data_dir) if layout.data_dir else None,
            "cache_dir": str(layout.cache_dir) if layout.cache_dir else None,
            "task_ids": [task.task_id for task in tasks], "task_pool": recipe.task_pool})
        result = launch_grpo(source, policy.base_model, policy.adapters, work_dir, recipe, resume=settings.resume,
                             answer_mode=settings.answer_mode, log=log, progress_figures=HEALTH_IN_PROGRESS,
                             rollout_server=settings.rollout_server)
    else:
        result = train_grpo(tasks, toolboxes, policy.base_model, policy.adapters, work_dir, recipe,
                            resume=settings.resume, callbacks=[LogProgress(log, "reward", HEALTH_IN_PROGRESS)],
                            answer_mode=settings.answer_mode,
                            backend_factory=policy_server(settings.rollout_server, work_dir, recipe.rollout_batch_size))
    m = result.metrics
    if screening is not None:
        m["task_screening"] = screening
    log(f"GRPO to step {result.global_step}: {m['seconds_per_step']} s/step, split "
        f"{m['time_split_per_step']}, final reward {m['final_reward']}")
    refuse_no_op(m["steps"], work_dir)
    log(f"GRPO learning: {learning_line(m.get('learning'))}")

    policies = {start_name: policy.adapters, asset: [*policy.adapters, result.adapter_dir]}
    suites = validation_suites(layout, datasets, validation_settings)
    start_report = saved_report(layout.asset_dir(start_name) / "validation.json", start_name, validation_settings, suites)
    if start_report is not None:
        log(f"{start_name}: its published validation scored the same {len(start_report['per_task'])} tasks "
            "with the same settings; reused, not re-run")
        policies.pop(start_name)
    validation = validate_policies(layout, datasets, validation_settings, policy.base_model, policies, log,
                                   suites=suites)
    if start_report is not None:
        validation = {start_name: start_report, **validation}
    versus_sft = paired_difference(validation[asset], validation[start_name])
    log(f"{asset} minus {start_name}, NDCG@10 on the same {versus_sft.get('n_tasks', 0)} validation tasks: {versus_sft}")
    gain_key = "rl_minus_sft_ndcg@10" if asset == ASSET else f"{asset}_minus_{start_name}_ndcg@10"
    folder = layout.asset_dir(asset)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        shutil.copytree(result.adapter_dir, staging / "adapter")
        (staging / "metrics.json").write_text(json.dumps(m, indent=2))
        (staging / "validation.json").write_text(json.dumps(validation_document(validation_settings, validation), indent=2))
        (staging / "lineage.json").write_text(json.dumps({
            "base_model": layout.relative(policy.base_model), "sft_model_md5": sft_md5,
            "adapters": [*(layout.relative(a) for a in policy.adapters), layout.relative(folder / "adapter")],
            "recipe": recipe.to_dict(), "recipe_digest": recipe.digest,
        }, indent=2))
    steps = m["steps"]
    last = steps[-1] if steps else {}
    artifact = StageArtifact(
        folder,
        params={**recipe.to_dict(), "recipe_digest": recipe.digest, "sft_model_md5": sft_md5,
                "precision": m["precision"], "device": m["device"]},
        metrics={**rl_metrics(m, validation),
                 **({gain_key: versus_sft["mean"]} if versus_sft.get("n_tasks") else {})},
        metadata={
            "global_step": result.global_step,
            "resumed_from": result.resumed_from or "none",
            "seconds_per_step": m["seconds_per_step"],
            "time_split_per_step": Json(m["time_split_per_step"]),
            "final_reward": m["final_reward"],
            "reward_curve": Json([{k: s.get(k) for k in ("step", "reward", "reward_std", "frac_reward_zero_std")}
                                  for s in steps]),
            "health": Json(last),
            "learning": Json(m.get("learning")),
            "task_screening": Json(screening_summary(screening)),
            "validation": Markdown(validation_table(validation)),
            gain_key: Json(versus_sft),
        },
        texts={"validation.json": json.dumps(validation, indent=2), "metrics.json": json.dumps(m, indent=2)},
        series=rl_series(steps),
        artifacts={"adapter": folder / "adapter"},
        cleanup=(work_dir,),
    )
    return RLModelResult(artifact, m, validation, result.global_step, result.resumed_from)


class NoLearningSignal(RuntimeError):
    """A GRPO run whose update could not have changed the policy."""


def refuse_no_op(steps: Sequence[Mapping], work_dir: Path) -> None:
    """Raise when no step of the run had a learning signal: every group's rewards were equal
    (``frac_reward_zero_std`` 1, so every advantage and gradient was 0) or no rollout gave a
    valid answer. Such an adapter is the SFT policy plus noise and must never be published."""
    if not steps:
        raise NoLearningSignal(f"the GRPO run logged no step (see {work_dir})")
    flat = all(step.get("frac_reward_zero_std", 0.0) >= 1.0 for step in steps)
    invalid = all(step.get("rollout/valid_rate", 1.0) <= 0.0 for step in steps)
    if flat or invalid:
        why = "every group's rewards were equal (frac_reward_zero_std = 1)" if flat else \
            "no rollout gave a valid answer (rollout/valid_rate = 0)"
        raise NoLearningSignal(
            f"GRPO had no learning signal in any of its {len(steps)} steps: {why}. The adapter was not published; "
            f"the run's checkpoints and metrics.json stay in {work_dir}. Raise the temperature or num_generations, "
            "give the policy more max_new_tokens per turn, or train SFT first so that rewards vary within groups.")


def rl_metrics(m: dict, validation: dict) -> dict[str, float]:
    """The run's figures, its time split per step, the last step's health figures and the validation."""
    last = m["steps"][-1] if m["steps"] else {}
    metrics = {k: m[k] for k in LOGGED_METRICS if m.get(k) is not None}
    metrics.update({f"time_{k}": v for k, v in m["time_split_per_step"].items() if v is not None})
    metrics.update({f"last_{k}": v for k, v in last.items() if k != "step" and isinstance(v, (int, float))})
    metrics.update(learning_metrics(m.get("learning")))
    metrics.update(validation_metrics(validation))
    return metrics


def learning_metrics(learning: Mapping | None) -> dict[str, float]:
    """The reward's first and last quarter and the train tasks' last-minus-first visit, flat."""
    if not learning:
        return {}
    out = {}
    if learning.get("reward"):
        for quarter in ("first_quarter", "last_quarter"):
            mean, se = learning["reward"][quarter]
            out[f"reward_{quarter}"], out[f"reward_{quarter}_se"] = mean, se
    if learning.get("mean_frac_reward_zero_std") is not None:
        out["mean_frac_reward_zero_std"] = learning["mean_frac_reward_zero_std"]
    visits = learning.get("tasks_first_and_last_visit") or {}
    if visits.get("tasks"):
        out["task_visits_last_minus_first"], out["task_visits_last_minus_first_se"] = visits["difference"], visits["se"]
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def learning_line(learning: Mapping | None) -> str:
    """One log line: reward by quarter, zero-std groups, the paired per-task change."""
    metrics = learning_metrics(learning)
    if not metrics:
        return "no steps logged"
    parts = []
    if "reward_first_quarter" in metrics:
        parts.append(f"reward first quarter {metrics['reward_first_quarter']} +- {metrics.get('reward_first_quarter_se')}, "
                     f"last {metrics['reward_last_quarter']} +- {metrics.get('reward_last_quarter_se')}")
    if "mean_frac_reward_zero_std" in metrics:
        parts.append(f"mean frac_reward_zero_std {metrics['mean_frac_reward_zero_std']}")
    if "task_visits_last_minus_first" in metrics:
        parts.append(f"rollout NDCG@10 per task, last minus first visit {metrics['task_visits_last_minus_first']} "
                     f"+- {metrics.get('task_visits_last_minus_first_se')}")
    return "; ".join(parts)


def screening_summary(screening: Mapping | None) -> dict:
    """The chosen tasks with their screening rewards' mean and spread (``{}``: no screening)."""
    if not screening:
        return {}
    rows = {row["task_id"]: row for row in screening["tasks"]}
    return {"pool_per_dataset": screening["pool_per_dataset"], "seconds": screening["seconds"],
            "own_answer_share": screening.get("own_answer_share"),  # absent from screenings saved before it
            "chosen": {task_id: {"mean": rows[task_id]["mean"], "std": rows[task_id]["std"]}
                       for task_id in screening["chosen"]}}


def rl_series(steps: list[dict]) -> dict[str, list[float]]:
    """Per-step curves of the health figures and of every reward function (non-empty ones only)."""
    series = {name: [s[name] for s in steps if name in s] for name in SERIES}
    rewards = sorted({k for s in steps for k in s if k.startswith("rewards/")})
    series.update({k: [s[k] for s in steps if k in s] for k in rewards})
    return {k: v for k, v in series.items() if v}
