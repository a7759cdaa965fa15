"""The champion/challenger rule: does a newly trained agent replace the serving one?

    from recthinker_dagster.serving.promotion import decide_promotion

    decision = decide_promotion(
        candidate={"ndcg@10": 0.452},          # eval-task figures of the new model
        champion={"ndcg@10": 0.430},           # the current champion's (None: no champion yet)
        base={"ndcg@10": 0.301},               # the untrained base model's
        metric="ndcg@10", margin=0.01,
    )
    decision.promote   # True
    decision.reasons   # ["ndcg@10 0.452 >= champion 0.430 + margin 0.010", "ndcg@10 0.452 > base 0.301"]

Rule: promote only if the candidate beats the champion by at least ``margin`` (absolute:
``candidate - champion >= margin`` and strictly better, so a tie never promotes, not even with
``margin=0``) AND strictly beats the untrained base model (the margin does not apply there).
Without a champion the candidate must still beat the base model. Differences within 1e-9 count
as ties (float noise).

A candidate trained from another policy (SFT+RL from the SFT agent) can also be held to its
``start``: it is rejected when it ranks worse than the policy it started from beyond noise, so
that a training run that broke its policy never serves, even without a champion. With the paired
test of the candidate against the start on the same eval tasks (``start_test``), that is a 95%
interval of the difference wholly below 0; without one, a figure below the start's.

With a significance ``level`` (the pipeline's default, 0.05), beating the champion also needs
the paired test of the candidate against the champion on the same eval tasks
(``test``: :func:`recthinker_dagster.metrics.paired_bootstrap_test`) to give ``p < level``. A
candidate that is better but not significantly so stays ``challenger``, and so does one whose
test could not be run (``untested``: why, e.g. the champion was scored on other tasks).

What is compared: one figure per metrics dict (each dict on its own):

- a flat dict (``{"ndcg@10": 0.41, "hr@10": ...}``) gives its ``metric`` value: the overall
  figure of the eval tasks (e.g. mean NDCG@10 over all eval tasks of both datasets and groups);
- a dict without a top-level ``metric`` but with per-group dicts, nested to any depth
  (``{"ml-1m": {"dense": {"ndcg@10": ...}, "sparse": {...}}, "amazon-cds": {...}}`` or
  ``{"ml-1m/dense": {"ndcg@10": ...}, ...}``) gives the unweighted mean of ``metric`` over its
  groups (every group counts the same, whatever its number of tasks). Two group-mean figures are
  only compared over the same groups: different group sets raise ``ValueError``.

A top-level value wins over groups in the same dict. A missing, non-numeric or NaN metric raises
``ValueError`` naming the dict. Pure Python: no MLflow here (``serving/registry.py`` applies
the decision to the Model Registry).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from recthinker_dagster.metrics import PairedTest

DEFAULT_METRIC = "ndcg@10"
TOLERANCE = 1e-9
GROUP_SEPARATOR = "/"


@dataclass(frozen=True)
class MetricFigure:
    """The figure compared for one metrics dict."""

    value: float
    groups: tuple[str, ...] = ()  # empty: a top-level (overall) value; else the averaged groups

    @property
    def source(self) -> str:
        return "overall" if not self.groups else f"mean over {len(self.groups)} groups"


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reasons: list[str]
    metric: str
    margin: float
    candidate_value: float
    base_value: float
    champion_value: float | None  # None: there was no champion
    champion_version: str | None = None  # as given to decide_promotion (for the reasons and tags)
    beats_base: bool = False
    beats_champion: bool | None = None  # None: there was no champion
    groups: list[str] = field(default_factory=list)  # the groups averaged (empty: overall figures)
    level: float | None = None  # the significance level (None: means only)
    test: dict | None = None  # the paired test against the champion (PairedTest.to_dict())
    start_value: float | None = None  # the start policy's figure (None: not compared)
    keeps_start: bool | None = None  # not worse than the start beyond noise (None: not compared)
    start_test: dict | None = None  # the paired test of the candidate against its start

    @property
    def alias(self) -> str:
        """The registry alias this decision gives the candidate: ``champion`` or ``challenger``."""
        return "champion" if self.promote else "challenger"

    def to_dict(self) -> dict:
        return asdict(self)


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dicts flattened to ``"group/sub/metric"`` keys (values untouched)."""
    flat: dict[str, object] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + GROUP_SEPARATOR))
        else:
            flat[name] = value
    return flat


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, numeric strings from tags
        except (TypeError, ValueError):
            raise ValueError(f"{what} is not a number: {value!r}") from None
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{what} is NaN")
    return value


def metric_figure(metrics: Mapping | None, metric: str = DEFAULT_METRIC, *, role: str = "metrics") -> MetricFigure:
    """The figure of ``metrics`` that the rule compares (see the module docstring)."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{role} must be a dict of metrics, got {type(metrics).__name__}")  # noqa: TRY004 - a bad request
    if metric in metrics and not isinstance(metrics[metric], Mapping):
        return MetricFigure(_number(metrics[metric], f"{role} {metric}"))
    flat = flatten_metrics(metrics)
    suffix = GROUP_SEPARATOR + metric
    per_group = {key[: -len(suffix)]: value for key, value in flat.items() if key.endswith(suffix)}
    if not per_group:
        keys = sorted(flat)
        shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
        raise ValueError(f"{role} have no {metric!r}, neither overall nor per group (keys: {shown or 'none'})")
    values = [_number(value, f"{role} {group}/{metric}") for group, value in sorted(per_group.items())]
    return MetricFigure(sum(values) / len(values), tuple(sorted(per_group)))


def _check_same_groups(a: MetricFigure, b: MetricFigure, other: str, metric: str) -> None:
    if a.groups and b.groups and a.groups != b.groups:
        only_a = sorted(set(a.groups) - set(b.groups))
        only_b = sorted(set(b.groups) - set(a.groups))
        raise ValueError(
            f"the candidate's and the {other}'s {metric} cover different groups (only the candidate: "
            f"{only_a or 'none'}; only the {other}: {only_b or 'none'}); compare the same groups"
        )


def decide_promotion(
    candidate: Mapping,
    champion: Mapping | None,
    base: Mapping,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = 0.0,
    champion_version: str | int | None = None,
    level: float | None = None,
    test: PairedTest | None = None,
    untested: str = "",
    start: Mapping | None = None,
    start_test: PairedTest | None = None,
) -> PromotionDecision:
    """Promote ``candidate`` over ``champion`` (``None``: no champion yet)? See the module docstring.

    ``champion_version`` only labels the reasons (``"champion v3 0.430"``). ``start``: the figures
    of the policy the candidate was trained from (``None``: not compared)."""
    margin = _number(margin, "margin")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if level is not None and not 0 < _number(level, "level") < 1:
        raise ValueError(f"the significance level must be in (0, 1), got {level}")
    cand = metric_figure(candidate, metric, role="candidate metrics")
    base_fig = metric_figure(base, metric, role="base model metrics")
    _check_same_groups(cand, base_fig, "base model", metric)
    name = f"champion v{champion_version}" if champion_version is not None else "champion"

    reasons: list[str] = []
    champ_fig = None
    beats_champion = None
    if champion is None:
        reasons.append("no champion yet: the candidate only has to beat the base model")
    else:
        champ_fig = metric_figure(champion, metric, role="champion metrics")
        _check_same_groups(cand, champ_fig, "champion", metric)
        delta = cand.value - champ_fig.value
        beats_champion = delta > TOLERANCE and delta >= margin - TOLERANCE
        if beats_champion and level is not None:
            beats_champion, reason = _significant(test, level, untested, name)
            reasons.append(f"{metric} {cand.value:.3f} >= {name} {champ_fig.value:.3f} + margin {margin:.3f}, {reason}")
        elif beats_champion:
            reasons.append(f"{metric} {cand.value:.3f} >= {name} {champ_fig.value:.3f} + margin {margin:.3f}")
        elif abs(delta) <= TOLERANCE:
            reasons.append(f"{metric} {cand.value:.3f} ties {name} {champ_fig.value:.3f}: a tie keeps the champion")
        else:
            reasons.append(f"{metric} {cand.value:.3f} <= {name} {champ_fig.value:.3f} + margin {margin:.3f}")

    base_delta = cand.value - base_fig.value
    beats_base = base_delta > TOLERANCE
    if beats_base:
        reasons.append(f"{metric} {cand.value:.3f} > base {base_fig.value:.3f}")
    else:
        reasons.append(f"{metric} {cand.value:.3f} <= base {base_fig.value:.3f}: not better than the untrained base model")
    start_fig = None
    keeps_start = None
    if start is not None:
        start_fig = metric_figure(start, metric, role="start policy metrics")
        _check_same_groups(cand, start_fig, "start policy", metric)
        keeps_start, reason = _keeps_start(cand.value, start_fig.value, start_test, metric)
        reasons.append(reason)
    if cand.groups:
        reasons.append(f"{metric} figures are unweighted means over the groups {', '.join(cand.groups)}")

    promote = beats_base and beats_champion is not False and keeps_start is not False
    return PromotionDecision(
        promote=promote,
        reasons=reasons,
        metric=metric,
        margin=margin,
        candidate_value=cand.value,
        base_value=base_fig.value,
        champion_value=champ_fig.value if champ_fig is not None else None,
        champion_version=str(champion_version) if champion_version is not None else None,
        beats_base=beats_base,
        beats_champion=beats_champion,
        groups=list(cand.groups),
        level=level,
        test=test.to_dict() if test is not None else None,
        start_value=start_fig.value if start_fig is not None else None,
        keeps_start=keeps_start,
        start_test=start_test.to_dict() if start_test is not None else None,
    )


def _keeps_start(value: float, start_value: float, test: PairedTest | None, metric: str) -> tuple[bool, str]:
    """Is the candidate not worse than its start policy beyond noise? With the reason."""
    if test is None:
        keeps = value >= start_value - TOLERANCE
        verdict = "not below" if keeps else "below"
        return keeps, f"{metric} {value:.3f} {verdict} the start policy's {start_value:.3f} (means: no paired test)"
    figures = f"{_effect_text(test)}, {test.n_tasks} tasks"
    if test.ci_high < 0:
        return False, (f"{metric} {value:.3f} against the start policy's {start_value:.3f}: worse beyond noise "
                       f"({figures}): training broke the policy it started from")
    return True, f"{metric} {value:.3f} against the start policy's {start_value:.3f}: not worse beyond noise ({figures})"


def _significant(test: PairedTest | None, level: float, untested: str, name: str) -> tuple[bool, str]:
    """Is the paired test a significant win at ``level``? With the reason's second half."""
    if test is None:
        return False, f"but the paired test against the {name} could not run: {untested or 'no per-task figures'}"
    figures = f"{_effect_text(test)}, p = {test.p_value:.4f}, {test.n_tasks} tasks"
    if test.p_value < level:
        return True, f"significantly ({figures}; p below the level {level})"
    return False, f"but not significantly ({figures}; p not below the level {level})"


def _effect_text(test: PairedTest) -> str:
    return f"paired bootstrap effect {test.effect:+.3f} [{test.ci_low:+.3f}, {test.ci_high:+.3f}]"
