"""Tune the scripted investigator's fusion weights on train or valid tasks (never eval).

Running the whole agent loop per trial is slow, so :func:`gather` records, once per task,
everything the policy could gather (the co-occurrence links of *every* candidate), and
:func:`replay` reproduces the policy's ranking for any weights: stage 1, the contenders it
would investigate, their links only, stage 2. :func:`tune` is a seeded random local search
maximizing the mean of NDCG@1, @5 and @10, averaged over groups so that each group counts
the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from recthinker_dagster.agent.teachers import narrative as N
from recthinker_dagster.agent.teachers.evidence import Evidence, FusionWeights
from recthinker_dagster.agent.teachers.scripted import Investigator, InvestigatorSettings, ScriptedTeacher
from recthinker_dagster.agent.trajectory import AgentTask
from recthinker_dagster.metrics import task_metrics

TUNED = tuple(f.name for f in fields(FusionWeights) if f.name not in ("decay", "cooc_baseline"))


@dataclass
class Case:
    """One task's full evidence, its group and target, and the calls made before the contenders."""

    evidence: Evidence
    group: str
    target: str
    calls: int


def gather(task: AgentTask, box, teacher: ScriptedTeacher) -> Case:
    """What the canonical policy would record for ``task`` (by running its first two rounds),
    plus the links of every candidate."""
    inv = Investigator(task, box, teacher, teacher.config)
    ev, calls = inv.ev, 0
    for make in (inv.round_assess, inv.round_fill):
        _, steps = make()
        inv.made += [step.call for step in steps]
        for step in steps:
            ev.record(*step.call)
        calls += len(steps)
    for label in ev.labels:
        ev.record("get_related_items", {"item_id": label, "limit": teacher.settings.related_limit})
    return Case(ev, task.group, task.target_item_id, calls)


def replay(case: Case, w: FusionWeights, settings: InvestigatorSettings, budget: int = 7) -> list[str]:
    """The ranking (item ids) the policy would give with weights ``w`` (``budget``: its calls)."""
    ev = case.evidence
    all_links, ev.links = ev.links, {}
    try:
        ev.clear_cache()
        order = [k for k in np.argsort(-ev.stage1(w), kind="stable")]
        k = settings.contenders - (1 if N.cf_margin(ev) >= settings.confident_margin else 0)
        k = max(0, min(k, budget - case.calls))
        ev.links = {i: all_links[i] for i in order[:k]}
        return [ev.items[i] for i in ev.order(w)]
    finally:
        ev.links = all_links


def score(cases: Sequence[Case], w: FusionWeights, settings: InvestigatorSettings) -> dict[str, dict[str, float]]:
    """Mean NDCG@1/5/10 per group."""
    per_group: dict[str, list[dict]] = {}
    for case in cases:
        per_group.setdefault(case.group, []).append(task_metrics(replay(case, w, settings), case.target))
    return {g: {m: float(np.mean([r[m] for r in rows])) for m in ("ndcg@1", "ndcg@5", "ndcg@10")}
            for g, rows in per_group.items()}


def objective(metrics: dict[str, dict[str, float]]) -> float:
    return float(np.mean([sum(m.values()) / len(m) for m in metrics.values()]))


def tune(cases: Sequence[Case], settings: InvestigatorSettings, start: FusionWeights | None = None, *,
         iterations: int = 200, step: float = 0.3, seed: int = 0,
         log: Callable[[str], None] | None = None) -> tuple[FusionWeights, float]:
    """Random local search from ``start``: perturb a few weights, keep improvements."""
    rng = np.random.default_rng(seed)
    best = start or FusionWeights()
    best_value = objective(score(cases, best, settings))
    for it in range(iterations):
        values = {}
        for name in TUNED:
            if rng.random() < 0.4:
                values[name] = max(0.0, getattr(best, name) + rng.normal(0.0, step))
        if not values:
            continue
        trial = replace(best, **values)
        value = objective(score(cases, trial, settings))
        if value > best_value:
            best, best_value = trial, value
            if log:
                log(f"iteration {it}: objective {value:.4f}")
    return best, best_value
