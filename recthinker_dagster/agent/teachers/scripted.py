"""The scripted investigator: an offline, CPU-only teacher that really uses the tools.

Design: the teacher is a :class:`~recthinker_dagster.agent.backends.base.Backend` driven by
the agent's own loop (``run_agent``). Each ``generate`` call writes the next assistant turn
of every conversation as plain text ("Analysis: ... Plan: ..." then ``<tool_call>`` blocks
or ``<answer>``); the loop parses it, runs the calls through the real ``Toolbox``, appends
the real outputs as tool messages, enforces the budgets and computes the metrics. So the
trajectories have exactly the agent's format.

Policy per task (:class:`Investigator`): three short turns, two tool calls.

1. *Assess the prompt*: what the recent items say, and what is missing: the history length,
   which decides how far to trust the recent sequence. Call ``get_user_profile``.
2. *Choose the signals*: from the profile's history length, the regime (``fusion.regime``) and
   its weights (``fusion.weights_for``: tuned per dataset and regime on train and valid tasks).
   Call ``score_candidates`` with them.
3. *Answer* with the order of that score table, which the student can read from the last tool
   output: the answer is reproducible from the conversation.

Budgets: with two turns the profile and the scores are fetched together (short-history
weights, the profile not yet read); with a single turn, or fewer than three tool calls (two
and a spare, so that the loop never has to force the answer), the teacher answers at once with
the fused order of the weights it would have asked for (a degenerate budget). Signals the
tool suite lacks are left out of the weights.

Samples: ``sample_index`` 0 is the canonical policy. Sample k > 0 multiplies each weight by
``exp(N(0, perturb))`` (rounded to one decimal), seeded by ``(seed, task_id, sample_index)``:
the K samples of a task try nearby weightings, and filtering keeps the ones that rank well.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.backends.base import Generation, SamplingParams
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.parser import format_tool_call
from recthinker_dagster.agent.teachers import fusion
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory
from recthinker_dagster.tools.signals import available_signals, fused_order, score_table_labels

PRODUCER = "scripted-investigator-v3"
WHY = {
    "short": "the user's own signal is thin, so collaborative evidence from other users matters most",
    "long": "the user's own sequence is rich, and its recent end says most about what comes next",
}


@dataclass(frozen=True)
class InvestigatorSettings:
    """The policy's knobs (see the module docstring)."""

    perturb: float = 0.3  # weight noise for samples > 0
    weights_table: Mapping[str, Mapping] | None = None  # None: the tuned table (``tuned_weights.py``)


class ScriptedTeacher:
    """``ScriptedTeacher(config).run(tasks, toolbox_factory, sample_index=k)``: trajectories
    produced by :class:`Investigator` through ``run_agent`` (producer ``scripted-investigator-v3``)."""

    name = PRODUCER

    def __init__(self, config: AgentConfig | None = None, settings: InvestigatorSettings | None = None):
        self.policy: type[Investigator] = Investigator  # the per-task policy (the thinking teacher swaps it)
        self.config = config or AgentConfig()
        self.settings = settings or InvestigatorSettings()

    def run(self, tasks: Iterable[AgentTask | Mapping], toolbox_factory: Callable, config: AgentConfig | None = None,
            *, sample_index: int = 0, seed: int = 0) -> list[Trajectory]:
        config = replace(config or self.config, producer=self.name)
        backend = InvestigatorBackend(self, config, sample_index=sample_index, seed=seed)
        return run_agent(tasks, backend, backend.wrap(toolbox_factory), config)


class InvestigatorBackend:
    """A ``Backend`` whose replies come from one :class:`Investigator` per conversation.

    ``wrap(toolbox_factory)`` creates an investigator as the loop creates each task's toolbox;
    a new conversation is matched to it by its first user message, then by identity (the loop
    extends the same message list every step)."""

    def __init__(self, teacher: ScriptedTeacher, config: AgentConfig, *, sample_index: int = 0, seed: int = 0):
        self.name = teacher.name
        self.teacher, self.config = teacher, config
        self.sample_index, self.seed = sample_index, seed
        self.waiting: dict[str, list[Investigator]] = {}  # first user message -> not yet started
        self.active: dict[int, Investigator] = {}  # id(messages) -> its investigator

    def wrap(self, toolbox_factory: Callable) -> Callable:
        def factory(task: AgentTask):
            box = toolbox_factory(task)
            key = prompts.user_prompt(task.history_lines, box.candidate_lines(), task.user_id)
            investigator = self.teacher.policy(task, box, self.teacher.settings, self.config,
                                               sample_index=self.sample_index, seed=self.seed)
            self.waiting.setdefault(key, []).append(investigator)
            return box
        return factory

    def _investigator(self, messages: list[dict]) -> Investigator | None:
        found = self.active.get(id(messages))
        if found is None and len(messages) > 1 and self.waiting.get(messages[1]["content"]):
            found = self.active[id(messages)] = self.waiting[messages[1]["content"]].pop(0)
        return found

    def generate(self, conversations: Sequence[list[dict]], tools, params: SamplingParams) -> list[Generation]:
        out = []
        for messages in conversations:
            start = time.perf_counter()
            investigator = self._investigator(messages)
            if investigator is None:
                out.append(Generation("", finish_reason="error", error="conversation of an unregistered task"))
                continue
            text = investigator.next_turn(messages)
            out.append(Generation(text, seconds=time.perf_counter() - start))
        return out


def task_rng(seed: int, task_id: str, sample_index: int) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{seed}/{task_id}/{sample_index}".encode()))


def perturbed(weights: Mapping[str, float], rng: np.random.Generator, sigma: float) -> dict[str, float]:
    """Every weight times ``exp(N(0, sigma))`` (same sign), as :func:`fusion.rounded` writes it."""
    return fusion.rounded({name: w * math.exp(rng.normal(0.0, sigma)) for name, w in weights.items()})


class Investigator:
    """The policy for one task: assess, choose the signals, rank by the score table."""

    def __init__(self, task: AgentTask, box, settings: InvestigatorSettings, config: AgentConfig, *,
                 sample_index: int = 0, seed: int = 0):
        self.task, self.box, self.settings, self.config = task, box, settings, config
        self.sample_index = sample_index
        self.rng = task_rng(seed, task.task_id, sample_index)
        self.turn = 0
        self.table: list[str] | None = None  # labels of the last score table, best first
        self.weights: dict[str, float] | None = None

    def next_turn(self, messages: list[dict]) -> str:
        self.turn += 1
        forced = messages[-1]["role"] == "user" and len(messages) > 2  # final-answer request or nudge
        self._read_scores(messages)
        calls_ok = self.config.max_tool_calls >= 3  # two calls and one spare: the loop never forces the answer
        if forced or self.table is not None or not calls_ok or self.config.max_turns < 2:
            return self._answer()
        if self.turn == 1 and self.config.max_turns >= 3:
            return self._act(self._assessment(), "Read the profile for the history length.",
                             [("get_user_profile", {})])
        if self.turn == 1:  # two turns: fetch both at once
            weights = self._weights("short")
            return self._act(self._assessment(), "Read the profile, and score the candidates with the "
                             "short-history weights.", [("get_user_profile", {}), self._score_call(weights)])
        n = self.box.profile()["n_items"]
        regime = fusion.regime(n)
        weights = self._weights(regime)
        analysis = f"The history has {n} items, a {regime} one: {WHY[regime]}."
        # the plan names the regime; the call carries its weights (written once: short conversations)
        return self._act(analysis, f"Score the candidates with the {regime}-history weights.",
                         [self._score_call(weights)])

    # ---------------------------------------------------------------- turns
    def _assessment(self) -> str:
        """What the recent items in the prompt say, and what is missing."""
        catalog = self.box.indexes.catalog
        recent = self.task.history_item_ids[-len(self.task.history_lines):] if self.task.history_lines else []
        top = Counter(c for item in recent for c in catalog.categories_of(item)).most_common(2)
        taste = f"The recent items are mostly {' and '.join(c for c, _ in top)}. " if top else ""
        return taste + "The history length is unknown, and it decides how far to trust the recent sequence."

    def _weights(self, regime: str) -> dict[str, float]:
        weights = fusion.teacher_weights(self.task.dataset, regime, available_signals(self.box.indexes),
                                         self.settings.weights_table)
        if self.sample_index > 0:
            weights = perturbed(weights, self.rng, self.settings.perturb)
        self.weights = weights
        return weights

    @staticmethod
    def _mix(weights: Mapping[str, float]) -> str:
        return ", ".join(f"{name} {w:g}" for name, w in weights.items())

    @staticmethod
    def _score_call(weights: Mapping[str, float]) -> tuple[str, dict]:
        return "score_candidates", {"weights": dict(weights)}

    def _act(self, analysis: str, plan: str, calls: list[tuple[str, dict]]) -> str:
        blocks = "\n".join(format_tool_call(name, args) for name, args in calls)
        return f"Analysis: {analysis}\nPlan: {plan}\n{blocks}"

    def _fused_labels(self, weights: Mapping[str, float]) -> list[str]:
        """The candidates' labels in the order of their fused score (what ``score_candidates`` would show)."""
        labels = list(self.box.labels)
        return [labels[k] for k in fused_order(self.box.fused_scores(weights))]

    def _read_scores(self, messages: list[dict]) -> None:
        self.table = last_score_table(messages) or None

    def _answer(self) -> str:
        labels = list(self.box.labels)
        if self.table is not None and sorted(self.table) == sorted(labels):
            order = self.table
            top = ", ".join(order[:3])
            analysis = f"The scores rank {top} first."
            plan = "Rank in the order of the score table."
        else:  # no usable table: the fused order of the weights it chose (or would choose)
            weights = self.weights or self._weights("short")
            order = self._fused_labels(weights)
            analysis = "There is no score table to read."
            plan = f"Rank by {self._mix(weights)}."
        return f"Analysis: {analysis}\nPlan: {plan}\n" + prompts.answer_block(order)



def last_score_table(messages: Sequence[Mapping]) -> list[str]:
    """The labels of the conversation's last ``score_candidates`` output, best first (empty: none)."""
    for message in reversed(messages):
        if message.get("role") == "tool" and message.get("name") == "score_candidates":
            return score_table_labels(str(message.get("content", "")))
    return []
