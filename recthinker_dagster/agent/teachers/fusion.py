"""Which ``score_candidates`` weights the scripted teacher asks for: per dataset and history regime.

The teacher reads the user's history length from the profile, names the regime (``short`` or
``long`` history, split at ``LONG_HISTORY`` items) and asks ``score_candidates`` for that
regime's weights over the signals of ``tools/signals.py``. The weights come from
:data:`~recthinker_dagster.agent.teachers.tuned_weights.TUNED`, which
``scripts/evaluate_teachers.py --tune`` writes after tuning on train and valid tasks only.

Lookup order for ``(dataset, regime)``: that entry, then the dataset's ``any`` entry (tuned on
all its train and valid tasks: a regime with no train or valid tasks of its own, such as
Amazon CDs' long histories, uses it), then the ``default`` entry of the regime, then
``DEFAULT_WEIGHTS``.
"""

from __future__ import annotations

from collections.abc import Mapping

from recthinker_dagster.agent.teachers.tuned_weights import TUNED

LONG_HISTORY = 75  # history items from which the user's own sequence is "long"
DEFAULT_WEIGHTS = {"bprmf": 1.0, "itemknn": 1.0, "sasrec": 1.0}
REGIMES = ("short", "long")


def regime(n_history: int) -> str:
    return "long" if n_history >= LONG_HISTORY else "short"


def weights_for(dataset: str, regime_name: str, table: Mapping[str, Mapping] | None = None) -> dict[str, float]:
    """The weights the teacher asks for (see the module docstring for the lookup order)."""
    table = TUNED if table is None else table
    for key, sub in ((dataset, regime_name), (dataset, "any"), ("default", regime_name), ("default", "any")):
        found = table.get(key, {}).get(sub)
        if found:
            return {name: float(w) for name, w in found.items() if w}
    return dict(DEFAULT_WEIGHTS)


def rounded(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights as the teacher writes them: one decimal, zeros dropped."""
    return {name: round(w, 1) for name, w in weights.items() if round(w, 1) != 0}


def teacher_weights(dataset: str, regime_name: str, available: tuple[str, ...] | list[str],
                    table: Mapping[str, Mapping] | None = None) -> dict[str, float]:
    """The weights the teacher asks ``score_candidates`` for: the tuned ones (:func:`weights_for`)
    over the signals the tool suite has, as the teacher writes them (BPR-MF alone when none is left)."""
    tuned = weights_for(dataset, regime_name, table)
    return rounded({name: w for name, w in tuned.items() if name in available}) or {"bprmf": 1.0}
