"""The best fusion of the classical signals, as a classical system: ``fusion``.

    ranker = FusionBaseline(indexes, "ml-1m")
    ranker.score(user_id, history, candidates)     # the fused score of every candidate

It scores the candidates as the scripted teacher's ``score_candidates`` call would: z-scored
signals of the tool suite (``tools/signals.py``), weighted with the teacher's tuned weights for
the dataset and the user's history regime (``agent/teachers/fusion.py``, tuned on train and
valid tasks only). No agent loop and no tools: the strongest baseline the evaluation offers,
against which an agent has to show what its reasoning adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recthinker_dagster.agent.teachers import fusion
from recthinker_dagster.tools.signals import available_signals, fused_scores

NAME = "fusion"


class FusionBaseline:
    name = NAME

    def __init__(self, indexes, dataset: str):
        self.indexes, self.dataset = indexes, dataset
        self.available = available_signals(indexes)

    def fit(self, interactions) -> FusionBaseline:
        return self  # the tool suite is already fitted (on the same index interactions)

    def weights(self, n_history: int) -> dict[str, float]:
        return fusion.teacher_weights(self.dataset, fusion.regime(n_history), self.available)

    def score(self, user_id: str, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        return fused_scores(self.indexes, self.weights(len(history)), user_id, list(history), list(candidates))

    def save(self, folder: Path) -> None:
        raise NotImplementedError("the fusion baseline has nothing of its own to save: it reads the tool suite")

    @classmethod
    def load(cls, folder: Path) -> FusionBaseline:
        raise NotImplementedError("build the fusion baseline from a loaded tool suite: FusionBaseline(indexes, dataset)")
