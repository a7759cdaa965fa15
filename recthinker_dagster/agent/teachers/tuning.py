"""Tune the scripted teacher's ``score_candidates`` weights on train and valid tasks (never eval).

:func:`gather` computes, once per task, every signal of ``tools/signals.py`` z-scored over the
candidates (a ``candidates x signals`` matrix) and the target's position; the teacher's ranking
for any weights is then one matrix product (:func:`ndcg_at_10`). :func:`tune` is a seeded
listwise (softmax) regression of the targets on the signals, rescaled and written with one
decimal as the teacher writes them; :func:`tune_table` tunes one entry per dataset and regime, plus the
dataset's ``any`` entry over all its tasks (see ``fusion.weights_for``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recthinker_dagster.agent.teachers import fusion
from recthinker_dagster.agent.trajectory import AgentTask
from recthinker_dagster.tools.signals import available_signals, standardized_signals


@dataclass
class Case:
    """One task's standardized signals, its target's position, dataset and regime."""

    signals: np.ndarray  # candidates x signal names
    target: int
    dataset: str
    regime: str


def gather(task: AgentTask, indexes, names: Sequence[str]) -> Case:
    candidates = list(task.candidate_item_ids)
    signals = standardized_signals(indexes, names, task.user_id, task.history_item_ids, candidates)
    return Case(signals, candidates.index(task.target_item_id), task.dataset,
                fusion.regime(len(task.history_item_ids)))


def signal_names(indexes) -> tuple[str, ...]:
    return available_signals(indexes)


def ndcg_at_10(cases: Sequence[Case], weights: np.ndarray) -> np.ndarray:
    """NDCG@10 of the fused order for every case (ties: candidate order, as ``fused_order``)."""
    out = np.zeros(len(cases))
    for i, case in enumerate(cases):
        scores = np.round(case.signals @ weights, 6)
        target = scores[case.target]
        rank = int((scores > target).sum() + (scores[: case.target] == target).sum())
        out[i] = 1.0 / np.log2(rank + 2) if rank < 10 else 0.0
    return out


def tune(cases: Sequence[Case], n_signals: int, *, l2: float = 1e-2, scale: float = 3.0) -> tuple[np.ndarray, float]:
    """Weights maximizing the listwise likelihood of the targets (softmax over each task's fused
    scores, L2 penalty ``l2``), rescaled so that the largest is ``scale`` and rounded to one
    decimal (as the teacher writes them); and their mean NDCG@10 over ``cases``.

    A smooth, convex surrogate of NDCG: on a few hundred tasks it generalizes better than a
    search on NDCG itself (measured on ML-1M valid tasks held out from a train-only fit)."""
    import torch

    signals = torch.tensor(np.stack([case.signals for case in cases]), dtype=torch.float64)
    targets = torch.tensor([case.target for case in cases])
    weights = torch.zeros(n_signals, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(signals @ weights, targets) + l2 * (weights ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = weights.detach().numpy()
    top = float(np.abs(fitted).max())
    best = np.round(fitted / top * scale, 1) if top > 0 else np.ones(n_signals)
    return best, float(ndcg_at_10(cases, best).mean())


def tune_table(cases: Sequence[Case], names: Sequence[str], *, l2: float = 1e-2,
               min_cases: int = 50) -> tuple[dict, dict]:
    """``({dataset: {regime or "any": {signal: weight}}}, {dataset/regime: [n cases, mean NDCG@10]})``.

    Entries with fewer than ``min_cases`` cases are left out (their tasks use the ``any`` entry)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    report: dict[str, list[float]] = {}
    for dataset in sorted({case.dataset for case in cases}):
        mine = [case for case in cases if case.dataset == dataset]
        groups = {"any": mine, **{r: [c for c in mine if c.regime == r] for r in fusion.REGIMES}}
        for name, group in groups.items():
            if len(group) < min_cases:
                continue
            weights, value = tune(group, len(names), l2=l2)
            table.setdefault(dataset, {})[name] = {n: float(w) for n, w in zip(names, weights) if w}
            report[f"{dataset}/{name}"] = [len(group), round(value, 4)]
    return table, report
