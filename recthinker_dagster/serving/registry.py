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
``promotion_test``              the paired test against the champion (``paired bootstrap,
                                one-sided, stratified by group`` or ``none``); with it
                                ``promotion_level``, ``promotion_p_value``,
                                ``promotion_effect``, ``promotion_effect_ci`` and
                                ``promotion_tasks`` (the task count)
``promotion_start_value``       the start policy's figure (``none`` when not compared); with
                                it ``promotion_start_effect_ci``, the paired interval of the
                                candidate minus its start (``none`` without per-task scores)
``metric.<name>``               every numeric metric, nested keys joined with ``/``, ``@``
                                written ``_at_`` (``metric.ml-1m/dense/ndcg_at_10``)
==============================  ===========================================================

The replaced champion keeps its version and its tags and gets ``replaced_by`` (the new
champion's version). The alias ``challenger`` points at the latest rejected version (and is
removed when it pointed at the version just promoted).

:func:`promote_registered_version` is the pipeline's promotion gate: it applies the rule to
the version described by ``assets/registered_model/registration.json``
(``stages/registration.py``). It keeps the candidate's per-task scores with its run
(``promotion/per_task.json``: ``{"<dataset>/<group>/<task_id>": value}``), so that a later
candidate can be tested against this one, task by task, once it is the champion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from recthinker_dagster.metrics import PairedTest, paired_bootstrap_test
from recthinker_dagster.serving.promotion import (
    PromotionDecision,
    decide_promotion,
    flatten_metrics,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRICS_TAG = "promotion_metrics"
METRIC_TAG_PREFIX = "metric."
PER_TASK_ARTIFACT = "promotion/per_task.json"
TEST_NAME = "paired bootstrap, one-sided, stratified by group"


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
        **paired_test_tags(decision),
        **start_tags(decision),
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


def start_tags(decision: PromotionDecision) -> dict[str, str]:
    """The start policy's version tags (``none`` when the candidate was not compared with one)."""
    if decision.start_value is None:
        return {"promotion_start_value": "none"}
    test = decision.start_test
    interval = f"[{test['ci_low']!r}, {test['ci_high']!r}]" if test is not None else "none"
    return {"promotion_start_value": repr(decision.start_value), "promotion_start_effect_ci": interval}


def paired_test_tags(decision: PromotionDecision) -> dict[str, str]:
    """The paired test's version tags (``promotion_test`` is ``none`` when no test ran)."""
    test = decision.test
    if test is None:
        return {"promotion_test": "none"}
    return {"promotion_test": TEST_NAME, "promotion_level": repr(decision.level),
            "promotion_p_value": repr(test["p_value"]), "promotion_effect": repr(test["effect"]),
            "promotion_effect_ci": f"[{test['ci_low']!r}, {test['ci_high']!r}]",
            "promotion_tasks": str(test["n_tasks"])}


def champion_per_task(client, version) -> dict[str, float] | None:
    """The per-task scores kept with a version's run (None when it has none: registered before
    per-task scores were kept, or by hand)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(version.run_id, PER_TASK_ARTIFACT, folder)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def paired_test(candidate: Mapping[str, float], champion: Mapping[str, float] | None
                ) -> tuple[PairedTest | None, str]:
    """The candidate against the champion on the same tasks, or None and why not."""
    if not candidate:
        return None, "the candidate has no per-task scores"
    if champion is None:
        return None, "the champion has no per-task scores (promotion/per_task.json)"
    if set(candidate) != set(champion):
        shared = len(set(candidate) & set(champion))
        return None, (f"the champion was scored on other eval tasks ({shared} shared of {len(candidate)}); "
                      "remove the champion alias to start over on the new tasks")
    return paired_by_task(candidate, champion), ""


def paired_by_task(candidate: Mapping[str, float], other: Mapping[str, float]) -> PairedTest:
    """The paired test of two systems' ``{"<dataset>/<group>/<task_id>": value}`` on the same
    tasks, stratified by dataset and group."""
    keys = sorted(candidate)
    strata = ["/".join(key.split("/", 2)[:2]) for key in keys]  # <dataset>/<group> (task ids may hold "/")
    return paired_bootstrap_test([candidate[k] for k in keys], [other[k] for k in keys], strata)


def paired_against_start(registration: Mapping) -> PairedTest | None:
    """The candidate against the policy it was trained from, on the same eval tasks (None when the
    record has no per-task scores of both)."""
    candidate = registration.get("candidate_per_task") or {}
    start = registration.get("start_per_task") or {}
    if not candidate or set(candidate) != set(start):
        return None
    return paired_by_task(candidate, start)


@dataclass(frozen=True)
class GateOutcome:
    """What the promotion gate did to a registered version."""

    version: str
    alias: str  # champion or challenger
    decision: PromotionDecision | None  # None: the version already was the champion (nothing decided)
    previous_champion: str | None = None


def promote_registered_version(client, registration: Mapping) -> GateOutcome:
    """Compare a registered version (a ``registration.json`` record: ``model_name``, ``version``,
    ``run_id``, ``candidate``, ``base``, ``metric``, ``margin``, ``significance_level`` and
    ``candidate_per_task``; ``start`` and ``start_per_task`` when the candidate was trained from
    another evaluated policy) with the champion and its start, and move the aliases."""
    name, version = registration["model_name"], str(registration["version"])
    per_task = registration.get("candidate_per_task") or {}
    if per_task and registration.get("run_id"):
        client.log_dict(registration["run_id"], per_task, PER_TASK_ARTIFACT)
    current = champion_version(client, name)
    if current is not None and str(current.version) == version:
        return GateOutcome(version, CHAMPION, None, version)
    test, untested = (None, "") if current is None else paired_test(per_task, champion_per_task(client, current))
    decision = decide_promotion(
        registration["candidate"], champion_metrics(client, name), registration["base"],
        metric=registration["metric"], margin=registration["margin"],
        champion_version=str(current.version) if current is not None else None,
        level=registration.get("significance_level"), test=test, untested=untested,
        start=registration.get("start"), start_test=paired_against_start(registration),
    )
    outcome = apply_promotion(client, name, version, decision, registration["candidate"])
    return GateOutcome(version, outcome["alias"], decision, outcome["previous_champion"])
