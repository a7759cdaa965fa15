"""Apply a promotion decision to the MLflow Model Registry (aliases ``champion`` / ``challenger``).

    from mlflow import MlflowClient
    from recthinker_dagster.serving.promotion import decide_promotion
    from recthinker_dagster.serving.registry import apply_promotion, champion_metrics, champion_version

    client = MlflowClient()
    current = champion_version(client, "recthinker-agent")            # ModelVersion or None
    decision = decide_promotion(candidate_metrics, champion_metrics(client, "recthinker-agent"),
                                base_metrics, metric="ndcg@10", margin=0.01,
                                champion_version=current.version if current else None)
    apply_promotion(client, "recthinker-agent", "4", decision, candidate_metrics)
    # promoted: alias champion -> v4, the old champion gets tag replaced_by=4
    # rejected: alias challenger -> v4; the champion stays

Tags written on the candidate version (always):

==============================  ===========================================================
``promotion_decision``          ``promoted`` or ``rejected``
``promotion_reasons``           the decision's reasons, joined with ``"; "``
``promotion_metric``            e.g. ``ndcg@10``; ``promotion_margin``, ``promotion_value``
                                (the candidate's figure), ``promotion_base_value``
``compared_champion_version``   the champion it was compared with (``none`` without one);
                                ``compared_champion_value`` likewise
``promotion_metrics``           the full metrics dict as JSON (``champion_metrics`` reads it)
``metric.<name>``               every numeric metric, nested keys joined with ``/``, ``@``
                                written ``_at_`` (``metric.ml-1m/dense/ndcg_at_10``)
==============================  ===========================================================

The replaced champion keeps its version and its tags and gets ``replaced_by`` (the new
champion's version). The alias ``challenger`` points at the latest rejected version (and is
removed when it pointed at the version just promoted).

:func:`promote_registered_version` is the pipeline's promotion gate: it applies the rule to
the version described by ``assets/registered_model/registration.json``
(``stages/registration.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from recthinker_dagster.serving.promotion import (
    PromotionDecision,
    decide_promotion,
    flatten_metrics,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRICS_TAG = "promotion_metrics"
METRIC_TAG_PREFIX = "metric."


def _metric_tag(name: str) -> str:
    return METRIC_TAG_PREFIX + name.replace("@", "_at_")


def _version_by_alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_version(client, name: str):
    """The ``ModelVersion`` the ``champion`` alias points at, or None (``str(.version)``: its
    type differs between stores)."""
    return _version_by_alias(client, name, CHAMPION)


def version_metrics(version) -> dict | None:
    """The metrics stored on a ``ModelVersion`` by :func:`apply_promotion` (None if none)."""
    tags = dict(version.tags or {})
    if METRICS_TAG in tags:
        return json.loads(tags[METRICS_TAG])
    flat = {key[len(METRIC_TAG_PREFIX):].replace("_at_", "@"): float(value)
            for key, value in tags.items() if key.startswith(METRIC_TAG_PREFIX)}
    return flat or None


def champion_metrics(client, name: str) -> dict | None:
    """The current champion's stored metrics; None when there is no champion.

    Raises ``ValueError`` when a champion exists but carries no metrics (an alias set by hand):
    comparing against nothing would let any candidate replace it."""
    version = champion_version(client, name)
    if version is None:
        return None
    metrics = version_metrics(version)
    if metrics is None:
        raise ValueError(
            f"the champion of {name!r} (version {version.version}) has no stored metrics (tag {METRICS_TAG}); "
            "run apply_promotion for it, or remove the alias to start over"
        )
    return metrics


def apply_promotion(client, name: str, version: str | int, decision: PromotionDecision,
                    metrics: Mapping) -> dict:
    """Tag ``version`` with the decision and move the aliases (see the module docstring).

    Returns ``{"alias", "version", "previous_champion"}`` (the champion before this call)."""
    version = str(version)
    previous = champion_version(client, name)
    previous_version = str(previous.version) if previous is not None else None
    tags = {
        "promotion_decision": "promoted" if decision.promote else "rejected",
        "promotion_reasons": "; ".join(decision.reasons),
        "promotion_metric": decision.metric,
        "promotion_margin": repr(decision.margin),
        "promotion_value": repr(decision.candidate_value),
        "promotion_base_value": repr(decision.base_value),
        "compared_champion_version": previous_version or "none",
        "compared_champion_value": repr(decision.champion_value) if decision.champion_value is not None else "none",
        METRICS_TAG: json.dumps(dict(metrics), sort_keys=True),
    }
    for key, value in flatten_metrics(metrics).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[_metric_tag(key)] = repr(float(value))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        if previous_version is not None and previous_version != version:
            client.set_model_version_tag(name, previous_version, "replaced_by", version)
        challenger = _version_by_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    return {"alias": decision.alias, "version": version, "previous_champion": previous_version}


@dataclass(frozen=True)
class GateOutcome:
    """What the promotion gate did to a registered version."""

    version: str
    alias: str  # champion or challenger
    decision: PromotionDecision | None  # None: the version already was the champion (nothing decided)
    previous_champion: str | None = None


def promote_registered_version(client, registration: Mapping) -> GateOutcome:
    """Compare a registered version (a ``registration.json`` record: ``model_name``, ``version``,
    ``candidate``, ``base``, ``metric``, ``margin``) with the champion and move the aliases."""
    name, version = registration["model_name"], str(registration["version"])
    current = champion_version(client, name)
    if current is not None and str(current.version) == version:
        return GateOutcome(version, CHAMPION, None, version)
    decision = decide_promotion(
        registration["candidate"], champion_metrics(client, name), registration["base"],
        metric=registration["metric"], margin=registration["margin"],
        champion_version=str(current.version) if current is not None else None,
    )
    outcome = apply_promotion(client, name, version, decision, registration["candidate"])
    return GateOutcome(version, outcome["alias"], decision, outcome["previous_champion"])
