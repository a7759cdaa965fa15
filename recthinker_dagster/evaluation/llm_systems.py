"""The LLM systems of the evaluation: the base model as a zero-shot ranker (no tools), the base
model with tools, trained policies (SFT, SFT+RL), and the think-before-recommend policies
(RecZero, RecOne: tool-free, ``agent/think.py``), all through the real agent loop.

    policies = {"zero_shot": Policy(base, []), "sft": Policy(base, [sft_adapter]), "sft@logits": ...}
    trajectories = run_llm_systems(policies, tasks, toolbox_factory, settings)

Each distinct model (base folder plus adapters) is loaded once and serves every system that
uses it (``sft`` and ``sft@logits``, the same policy in the other answer mode, share one); each
system's tasks run as one batch.

A system in ``logits`` mode whose twin in ``generate`` mode runs too (``sft@logits`` beside
``sft``) is read from the twin's rollouts: the evaluation decodes greedily, the two modes decode
alike up to ``<answer>``, and a generate-mode rollout records the head's scores there
(``Trajectory.head_scores``). Its rows share the twin's conversation, tokens and seconds; only
the answer differs. Should a rollout lack the scores (multi-token labels), the system runs itself.

A system named in ``settings["served_models"]`` (``{system: model name}``) generates on the
OpenAI-compatible server at ``$OPENAI_BASE_URL`` instead (``vllm serve`` with the adapters as
LoRA modules; docs/deploy.md), with no local model loaded. Its answers take the HTTP backends'
documented repair, counted per task, since nothing constrains a server's decoding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from recthinker_dagster.agent.backends.base import SamplingParams, head_ranking
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.prompts import answer_block
from recthinker_dagster.agent.think import think_config, without_tools
from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.evaluation.llm_progress import ChunkStore, files_fingerprint, tasks_fingerprint
from recthinker_dagster.metrics import task_metrics
from recthinker_dagster.progress import ProgressLog
from recthinker_dagster.settings import THINK_SYSTEMS, system_and_mode

ZERO_SHOT = "zero_shot"


@dataclass(frozen=True)
class Policy:
    base_model: Path
    adapters: tuple[Path, ...] = field(default_factory=tuple)


def agent_config_for(name: str, settings: dict) -> AgentConfig:
    """The agent budgets of system ``name``. Who orders the answer, the model's tokens or the
    label head (``logits``): the name's mode (``sft@logits``), else ``settings["answer_mode"]``
    (default ``generate``)."""
    system, mode = system_and_mode(name)
    sampling = SamplingParams(max_new_tokens=settings["max_new_tokens"])
    answer_mode = mode or settings.get("answer_mode", "generate")
    if system == ZERO_SHOT:
        return AgentConfig(max_turns=1, max_tool_calls=0, sampling=sampling, producer=name, answer_mode=answer_mode)
    if system in THINK_SYSTEMS:
        return think_config(sampling, producer=name, answer_mode=answer_mode)
    return AgentConfig(max_turns=settings["max_turns"], max_tool_calls=settings["max_tool_calls"], sampling=sampling,
                       producer=name, answer_mode=answer_mode)


def uses_tools(name: str) -> bool:
    return system_and_mode(name)[0] not in (ZERO_SHOT, *THINK_SYSTEMS)


ANSWER_SPAN = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def answer_mode_of(name: str, settings: dict) -> str:
    return system_and_mode(name)[1] or settings.get("answer_mode", "generate")


def generate_twin(name: str, systems: Sequence[str], settings: dict) -> str | None:
    """The system in ``generate`` mode whose greedy rollouts give ``name``'s (``logits`` mode) answers."""
    if answer_mode_of(name, settings) != "logits" or agent_config_for(name, settings).sampling.temperature > 0:
        return None
    base = system_and_mode(name)[0]
    return next((s for s in systems if system_and_mode(s)[0] == base and answer_mode_of(s, settings) == "generate"),
                None)


def read_by_head(rollout: Trajectory, producer: str) -> Trajectory | None:
    """A generate-mode rollout answered by the label head instead (what the same greedy rollout
    gives in ``logits`` mode); None when it has no head scores."""
    if rollout.head_scores is None:
        return None
    labels = head_ranking(rollout.head_scores, list(rollout.head_scores))  # recorded in candidate order
    item_of = dict(zip(rollout.final_labels, rollout.final_ranking))
    ranking = [item_of[label] for label in labels]
    messages = list(rollout.messages)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is not None:
        content = ANSWER_SPAN.sub(answer_block(labels), messages[last].get("content") or "")
        messages[last] = {**messages[last], "content": content}
    return replace(rollout, producer=producer, answer_mode="logits", final_labels=labels, final_ranking=ranking,
                   metrics=task_metrics(ranking, rollout.target_item_id), messages=messages, transcript=None)


CHUNK_BATCHES = 4  # tasks per progress line: this many backend batches


def ready(backend: Any) -> Callable[[], Any]:
    return lambda: backend


def chunk_key(system: str, policy: Policy, served_model: str | None, tasks: Sequence, settings: dict,
              batch_size: int, inputs_key: Any) -> dict:
    """What a system's evaluated chunks depend on (``llm_progress.ChunkStore``)."""
    return {
        "system": system,
        "model": {"served": served_model} if served_model else files_fingerprint([policy.base_model, *policy.adapters]),
        "settings": {k: v for k, v in settings.items() if k != "served_models"},
        "batch_size": batch_size,
        "tasks": tasks_fingerprint(tasks),
        "inputs": inputs_key,
    }


def run_llm_systems(policies: dict[str, Policy], tasks: Sequence, toolbox_factory: Callable, settings: dict, *,
                    batch_size: int | None = None, progress: Callable[[str], None] | None = None,
                    progress_dir: Path | None = None, inputs_key: Any = None) -> dict[str, list]:
    """``{system: trajectories}`` for every system in ``policies``, in task order; ``batch_size``
    (default ``settings["batch_size"]``, else 8): conversations per batch, or concurrent requests.

    ``progress_dir``: keep finished chunks there and reuse them (the module docstring);
    ``inputs_key``: what else the trajectories depend on (the tool indexes), part of the chunks' key."""
    batch_size = batch_size or settings.get("batch_size") or 8
    from recthinker_dagster.agent.backends.openai_backend import OpenAICompatibleBackend
    from recthinker_dagster.agent.backends.transformers_backend import (
        TransformersBackend,
    )
    from recthinker_dagster.models.loading import load_agent_model

    served = dict(settings.get("served_models") or {})
    by_model: dict[Policy, list[str]] = {}
    for system, policy in policies.items():
        if system not in served:
            by_model.setdefault(policy, []).append(system)
    results: dict[str, list] = {}
    say = progress or (lambda line: None)
    chunk = CHUNK_BATCHES * batch_size  # a few batches: progress (and its ETA) shows every few minutes
    stores = {
        system: ChunkStore.open(progress_dir, system, chunk_key(system, policy, served.get(system), tasks, settings,
                                                                batch_size, inputs_key))
        for system, policy in policies.items()
    } if progress_dir is not None else {}

    def finished(system: str) -> dict[int, list]:
        store = stores.get(system)
        if store is None:
            return {}
        found = {start: store.load(start, tasks[start : start + chunk]) for start in range(0, len(tasks), chunk)}
        kept = {start: done for start, done in found.items() if done is not None}
        if kept:
            say(f"LLM evaluation, {system}: {sum(map(len, kept.values()))}/{len(tasks)} tasks done before "
                f"(kept in {store.folder.name}), resuming")
        return kept

    def run(system: str, backend_for: Callable[[], Any], done: dict[int, list]) -> None:
        factory = toolbox_factory if uses_tools(system) else without_tools(toolbox_factory)
        config = agent_config_for(system, settings)
        report = ProgressLog(say, f"LLM evaluation, {system}", len(tasks), every=0.0)
        results[system] = []
        for start in range(0, len(tasks), chunk):
            found = done.get(start)
            if found is None:
                found = run_agent(tasks[start : start + chunk], backend_for(), factory, config)
                if system in stores:
                    stores[system].save(start, found)
            results[system] += found
            report(len(results[system]))

    for system, model_name in served.items():
        if system in policies:
            run(system, ready(OpenAICompatibleBackend(model=model_name, name=system, concurrency=batch_size)),
                finished(system))

    def lazy_backend(policy: Policy, name: str) -> Callable[[], Any]:
        """The policy's backend, its model loaded on the first call (when a chunk is left to run)."""
        loaded: list = []

        def backend() -> Any:
            if not loaded:
                model, tokenizer = load_agent_model(policy.base_model, list(policy.adapters))
                loaded.append(TransformersBackend(model, tokenizer, name=name, batch_size=batch_size))
            return loaded[0]
        return backend

    for policy, systems in by_model.items():
        done = {system: finished(system) for system in systems}
        backend = lazy_backend(policy, "+".join(systems))
        twins = {system: generate_twin(system, systems, settings) for system in systems}
        for system in sorted(systems, key=lambda name: twins[name] is not None):  # twins' sources first
            twin = twins[system]
            if twin is not None:
                read = [read_by_head(rollout, system) for rollout in results[twin]]
                if all(r is not None for r in read):
                    results[system] = read
                    say(f"LLM evaluation, {system}: read from {twin}'s rollouts by the label head")
                    continue
                say(f"LLM evaluation, {system}: {sum(r is None for r in read)} of {twin}'s rollouts have no "
                    f"head scores; running {system} itself")
            run(system, backend, done[system])
        del backend  # the model goes with it
    return {system: results[system] for system in policies}
