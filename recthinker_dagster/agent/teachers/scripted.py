"""The scripted investigator: an offline, CPU-only teacher that really uses the tools.

Design: the teacher is a :class:`~recthinker_dagster.agent.backends.base.Backend` driven by
the agent's own loop (``run_agent``). Each ``generate`` call writes the next assistant turn
of every conversation as plain text ("Analysis: ... Plan: ..." then ``<tool_call>`` blocks
or ``<answer>``); the loop parses it, runs the calls through the real ``Toolbox``, appends
the real outputs as tool messages, enforces the budgets and computes the metrics. So the
trajectories have exactly the agent's format (a turn that did not parse would show up as a
parse issue). The teacher decides from structured index data, the same data each tool just
rendered (``evidence.py``), and records evidence only for calls whose output was not an error.

Policy per task (:class:`Investigator`), in up to three call turns and an answer:

1. *Assess the prompt*: recent categories and creators, candidates without metadata. Call
   ``get_user_profile`` (history length, long-term taste) and ``score_candidates`` (BPR-MF
   on all candidates).
2. *Fill the gaps*: a short or medium history (< ``long_history`` items) means thin own
   signal, so ``find_similar_users(limit=similar_users)``; a long history means a rich own
   signal whose recent end matters most, so ``get_related_items`` on the latest history item.
   Candidates without metadata that BPR-MF ranks in its top ``info_leaders``: ``get_item_info``.
3. *Investigate the contenders*: fuse what is known (stage 1), then ``get_related_items`` on
   the ``contenders`` best (one fewer when BPR-MF has a clear leader): do they co-occur with
   the user's own history, and how recently?
4. *Answer* with the stage-2 fused ranking (``evidence.py``), citing the evidence.

Budgets: calls stay below ``max_tool_calls`` and call turns below ``max_turns``, so the loop
never has to force the answer; when calls run short the least useful ones are dropped
(contenders first, then item info, similar users, the profile); with two call turns steps
1 and 2 merge, with one step 3 is dropped too, with none the teacher ranks from the prompt.

Samples: ``sample_index`` 0 is the canonical policy. Sample k > 0 multiplies each fusion
weight by ``exp(N(0, perturb))``, shuffles the calls within a turn, and draws the number of
contenders (``contenders`` or one fewer), of similar users (``similar_users`` or 5 fewer)
and the long-history probe (related items of the latest item, or a ``search_user_history``
for the leading candidate's creator or main category), seeded by
``(seed, task_id, sample_index)``: the K samples of a task differ, reproducibly.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.backends.base import Generation, SamplingParams
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.parser import format_tool_call
from recthinker_dagster.agent.teachers import narrative as N
from recthinker_dagster.agent.teachers.evidence import Evidence, FusionWeights
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory

PRODUCER = "scripted-investigator-v1"
MAX_INFO_ITEMS = 10

Call = tuple[str, dict]


@dataclass(frozen=True)
class InvestigatorSettings:
    """The policy's knobs (see the module docstring)."""

    short_history: int = 50
    long_history: int = 100
    similar_users: int = 20
    similar_users_long: int = 0  # similar users for a long history (0: none, its own signal is rich)
    contenders: int = 4
    related_limit: int = 10
    confident_margin: float = 0.5  # BPR-MF top-two gap (in std) that counts as a clear leader
    item_info: str = "leaders"  # unknown candidates: "always" looked up in turn 1, "leaders" only, or "none"
    info_leaders: int = 5  # ("leaders") when among the BPR-MF top this many, in turn 2
    long_probe: str = "recent"  # long history, turn 2: "search" the history, "recent" (related
    # items of the latest history item) or "none"
    perturb: float = 0.25  # weight noise for samples > 0


class ScriptedTeacher:
    """``ScriptedTeacher(config).run(tasks, toolbox_factory, sample_index=k)``: trajectories
    produced by :class:`Investigator` through ``run_agent`` (producer ``scripted-investigator-v1``)."""

    name = PRODUCER

    def __init__(self, config: AgentConfig | None = None, weights: FusionWeights | None = None,
                 settings: InvestigatorSettings | None = None):
        self.config = config or AgentConfig()
        self.weights = weights or FusionWeights()
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
            investigator = Investigator(task, box, self.teacher, self.config,
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


@dataclass
class Step:
    """One planned call, why it is made, and how much it matters (0 = most)."""

    priority: int
    call: Call
    reason: str


class Investigator:
    """The policy for one task: turn by turn, analyse, plan, call, and finally rank."""

    def __init__(self, task: AgentTask, box, teacher: ScriptedTeacher, config: AgentConfig, *,
                 sample_index: int = 0, seed: int = 0):
        self.task, self.box, self.config = task, box, config
        self.rng = task_rng(seed, task.task_id, sample_index)
        s = teacher.settings
        self.weights = teacher.weights
        if sample_index > 0:
            self.weights = teacher.weights.perturbed(self.rng, s.perturb)
            s = replace(s, contenders=int(self.rng.choice([s.contenders - 1, s.contenders])),
                        similar_users=int(self.rng.choice([max(s.similar_users - 5, 5), s.similar_users])),
                        long_probe=str(self.rng.choice([s.long_probe, "search"])))
        self.settings, self.shuffle = s, sample_index > 0
        self.ev = Evidence(box, n_prompt=len(task.history_lines))
        self.calls_left = max(config.max_tool_calls - 1, 0)  # one spare: the loop never forces the answer
        self.turns_left = config.max_turns - 1  # turns that may call tools; the last one answers
        self.stage = 0
        self.pending: list[Call] = []  # calls of the previous turn, awaiting their tool messages
        self.made: list[Call] = []
        self.reported: set[str] = set()  # findings already written in an earlier turn

    # ------------------------------------------------------------------- driving
    def next_turn(self, messages: list[dict]) -> str:
        self._take_results(messages)
        forced = messages[-1]["role"] == "user" and len(messages) > 2  # final-answer request or nudge
        if forced or self.calls_left <= 0 or self.turns_left <= 0:
            return self._answer()
        rounds = [self.round_assess, self.round_fill, self.round_contenders]
        while self.stage < len(rounds):
            self.stage += 1
            analysis, steps = rounds[self.stage - 1]()
            keep = {id(step) for step in sorted(steps, key=lambda step: step.priority)[: self.calls_left]}
            steps = [step for step in steps if id(step) in keep]
            if steps:
                plan = "I will " + N.join([step.reason for step in steps]) + "."
                return self._act(analysis, plan, [step.call for step in steps])
        return self._answer()

    def _take_results(self, messages: list[dict]) -> None:
        """Record the evidence behind each call of the previous turn (its tool message, in order)."""
        if not self.pending:
            return
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        results = [m for m in messages[last + 1:] if m["role"] == "tool"]
        for (name, arguments), message in zip(self.pending, results):
            self.ev.record(name, arguments, ok=not str(message.get("content", "")).startswith("Error"))
        self.pending = []

    def _act(self, analysis: str, plan: str, calls: list[Call]) -> str:
        if self.shuffle:
            calls = [calls[i] for i in self.rng.permutation(len(calls))]
        self.pending = calls
        self.made += calls
        self.calls_left -= len(calls)
        self.turns_left -= 1
        blocks = "\n".join(format_tool_call(name, args) for name, args in calls)
        return f"Analysis: {analysis}\nPlan: {plan}\n{blocks}"

    def _findings(self) -> str:
        """The evidence gathered since the last turn, as sentences (each finding once)."""
        ev, rng = self.ev, self.rng
        sections = {
            "profile": lambda: N.history_regime_text(ev, self.regime()) if ev.profile is not None
            or "get_user_profile" in ev.failed else "",
            "cf": lambda: N.cf_text(ev, rng),
            "info": lambda: N.item_info_text(ev),
            "neighbours": lambda: N.neighbour_text(ev),
            "probes": lambda: N.probe_text(ev),
            "queries": lambda: N.query_text(ev),
            "links": lambda: N.links_text(ev, self.weights),
        }
        out = []
        for key, render in sections.items():
            if key not in self.reported and (text := render()):
                self.reported.add(key)
                out.append(text)
        return " ".join(out)

    def regime(self) -> str:
        """``short``, ``medium`` or ``long`` history (``unknown`` without a profile)."""
        n = self.ev.profile["n_items"] if self.ev.profile is not None else None
        if n is None:
            return "unknown" if self.ev.n_prompt >= 10 else "short"
        s = self.settings
        return "short" if n < s.short_history else "long" if n >= s.long_history else "medium"

    # -------------------------------------------------------------------- rounds
    def round_assess(self) -> tuple[str, list[Step]]:
        ev, rng, s = self.ev, self.rng, self.settings
        steps = [Step(1, ("get_user_profile", {}),
                      N.pick(rng, "read the profile for the history length and long-term taste",
                             "get the user's profile to learn how long the history is and what they like overall")),
                 Step(0, ("score_candidates", {"item_ids": list(ev.labels)}),
                      N.pick(rng, "score all candidates with BPR-MF for a collaborative signal",
                             "get BPR-MF scores for every candidate"))]
        unknown = N.unknown_candidates(ev)
        if unknown and s.item_info == "always":
            labels = [ev.labels[k] for k in unknown[:MAX_INFO_ITEMS]]
            steps.append(Step(3, ("get_item_info", {"item_ids": labels}),
                              f"look up {N.join(labels)} since the prompt does not say what they are"))
        if self.turns_left < 3:  # no turn to spare for waiting on the profile
            steps.append(Step(2, ("find_similar_users", {"limit": s.similar_users}),
                              "find similar users right away, as there are few turns to spare"))
        return N.prompt_assessment(ev, rng), steps

    def round_fill(self) -> tuple[str, list[Step]]:
        """Turn 2: what the history length calls for, and unknown candidates that BPR-MF likes."""
        if self._made_count("find_similar_users"):  # merged into turn 1
            return "", []
        ev, rng, s = self.ev, self.rng, self.settings
        regime, steps = self.regime(), []
        if regime == "long":
            note = (f"The history is long ({ev.n_history} items) and the prompt shows only {ev.n_prompt} of "
                    "them: the user's own signal is rich, and its recent end matters most.")
            if s.similar_users_long:
                steps.append(Step(1, ("find_similar_users", {"limit": s.similar_users_long}),
                                  f"check the {s.similar_users_long} most similar users"))
            if s.long_probe == "recent" and ev.history:
                latest = ev.history[-1]
                steps.append(Step(2, ("get_related_items", {"item_id": latest, "limit": s.related_limit}),
                                  "see which candidates other users consume together with the latest item, "
                                  f"{ev.catalog.title(latest, N.TITLE_CHARS)}"))
            elif s.long_probe == "search" and (query := self._query()):
                k, text, kind = query
                steps.append(Step(2, ("search_user_history", {"query": text, "limit": 5}),
                                  f"search the whole history for '{text}', the {kind} of {N.name(ev, k)}"))
        else:
            why = {"short": "short", "medium": "not long", "unknown": "of unknown length"}[regime]
            note = N.pick(rng, f"The history is {why}, so the user's own signal is thin and collaborative evidence "
                               "matters most.",
                          f"With a history that is {why}, I should lean on users with similar histories.")
            steps.append(Step(1, ("find_similar_users", {"limit": s.similar_users}),
                              f"see which candidates the {s.similar_users} most similar users have"))
        if leaders := self._unknown_leaders():
            labels = [ev.labels[k] for k in leaders]
            steps.append(Step(3, ("get_item_info", {"item_ids": labels}),
                              f"look up {N.join(labels)}, which BPR-MF ranks high although the prompt does not "
                              "say what they are"))
        return " ".join(t for t in (self._findings(), note) if t), steps

    def _unknown_leaders(self) -> list[int]:
        """("leaders") unknown candidates among BPR-MF's top ``info_leaders``."""
        ev, s = self.ev, self.settings
        if s.item_info != "leaders" or "cf" not in ev.raw:
            return []
        cf = np.nan_to_num(ev.raw["cf"], nan=-np.inf)
        leaders = set(np.argsort(-cf, kind="stable")[: s.info_leaders].tolist())
        return [k for k in N.unknown_candidates(ev) if k in leaders]

    def round_contenders(self) -> tuple[str, list[Step]]:
        ev, s = self.ev, self.settings
        k = s.contenders - (1 if N.cf_margin(ev) >= s.confident_margin else 0)
        k = min(k, self.calls_left, len(ev.labels))
        if k <= 0:
            return "", []
        order = self._stage1_order()
        analysis = " ".join(t for t in (self._findings(), N.contenders_text(ev, order, self.weights, k + 1)) if t)
        chosen = N.join([ev.labels[i] for i in order[:k]])
        reason = N.pick(self.rng,
                        f"check whether {chosen} co-occur with the user's own history before ranking",
                        f"fetch the related items of {chosen} to see which of them other users consume together "
                        "with this user's items")
        steps = [Step(0, ("get_related_items", {"item_id": ev.labels[i], "limit": s.related_limit}),
                      reason if n == 0 else "") for n, i in enumerate(order[:k])]
        return analysis, steps

    def _answer(self) -> str:
        ev = self.ev
        order = ev.order(self.weights)
        analysis = " ".join(t for t in (self._findings(), N.ranking_text(ev, order, self.rng)) if t)
        plan = N.pick(self.rng, f"I have enough evidence; rank all {len(order)} candidates now.",
                      f"No further tool would change the order much; give the full ranking of {len(order)} "
                      "candidates.")
        labels = ", ".join(ev.labels[k] for k in order)
        return f"Analysis: {analysis}\nPlan: {plan}\n{prompts.ANSWER_OPEN}{labels}{prompts.ANSWER_CLOSE}"

    # ------------------------------------------------------------------- helpers
    def _made_count(self, name: str) -> int:
        return sum(1 for n, _ in self.made if n == name)

    def _stage1_order(self) -> list[int]:
        score = np.round(self.ev.stage1(self.weights), 9)
        return np.lexsort((np.arange(len(score)), -score)).tolist()

    def _query(self) -> tuple[int, str, str] | None:
        """``(candidate, query, kind)``: the creator, else the main category, of the best
        stage-1 candidate that has either."""
        for k in self._stage1_order()[:3]:
            item = self.ev.items[k]
            if creator := self.ev.creator(item):
                return k, creator, "creator"
            if cats := self.ev.catalog.categories_of(item):
                return k, cats[0], "main category"
        return None
