"""The champion/challenger rule (``serving/promotion.py``): every branch, no MLflow; then the
``registered_model`` asset and its ``promotion_gate`` check on a real MLflow registry, with a
fake trained policy (empty folders: registering never loads the model)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from recthinker_dagster.serving.promotion import (
    PromotionDecision,
    decide_promotion,
    flatten_metrics,
    metric_figure,
)

BASE = {"ndcg@10": 0.300, "hr@10": 0.5}


def test_no_champion_promotes_a_candidate_that_beats_the_base_model():
    decision = decide_promotion({"ndcg@10": 0.35}, None, BASE)
    assert decision.promote and decision.alias == "champion"
    assert decision.beats_base and decision.beats_champion is None and decision.champion_value is None
    assert decision.reasons == ["no champion yet: the candidate only has to beat the base model",
                                "ndcg@10 0.350 > base 0.300"]


def test_no_champion_still_has_to_beat_the_base_model():
    decision = decide_promotion({"ndcg@10": 0.29}, None, BASE)
    assert not decision.promote and decision.alias == "challenger"
    assert "ndcg@10 0.290 <= base 0.300: not better than the untrained base model" in decision.reasons


def test_a_tie_with_the_base_model_is_not_a_win():
    assert not decide_promotion({"ndcg@10": 0.3}, None, BASE).promote
    # float noise is a tie too
    assert not decide_promotion({"ndcg@10": 0.1 + 0.2}, None, {"ndcg@10": 0.3}).promote


def test_beating_the_champion_by_the_margin_promotes():
    decision = decide_promotion({"ndcg@10": 0.452}, {"ndcg@10": 0.430}, BASE, margin=0.01, champion_version=3)
    assert decision.promote and decision.beats_champion and decision.beats_base
    assert decision.reasons == ["ndcg@10 0.452 >= champion v3 0.430 + margin 0.010", "ndcg@10 0.452 > base 0.300"]
    assert decision.champion_value == 0.430 and decision.champion_version == "3"


def test_better_than_the_champion_but_within_the_margin_does_not_promote():
    decision = decide_promotion({"ndcg@10": 0.435}, {"ndcg@10": 0.430}, BASE, margin=0.01)
    assert not decision.promote and decision.beats_champion is False and decision.beats_base
    assert decision.reasons[0] == "ndcg@10 0.435 <= champion 0.430 + margin 0.010"


def test_a_gain_of_exactly_the_margin_promotes_despite_float_noise():
    assert 0.03 - 0.02 < 0.01  # the noise the rule must absorb
    assert decide_promotion({"ndcg@10": 0.03}, {"ndcg@10": 0.02}, {"ndcg@10": 0.0}, margin=0.01).promote
    assert decide_promotion({"ndcg@10": 0.44}, {"ndcg@10": 0.43}, BASE, margin=0.01).promote


def test_a_tie_with_the_champion_keeps_the_champion_even_without_margin():
    decision = decide_promotion({"ndcg@10": 0.43}, {"ndcg@10": 0.43}, BASE)
    assert not decision.promote and decision.beats_champion is False
    assert decision.reasons[0] == "ndcg@10 0.430 ties champion 0.430: a tie keeps the champion"


def test_any_gain_promotes_with_zero_margin():
    assert decide_promotion({"ndcg@10": 0.4301}, {"ndcg@10": 0.43}, BASE).promote


def test_worse_than_the_champion_does_not_promote():
    decision = decide_promotion({"ndcg@10": 0.41}, {"ndcg@10": 0.43}, BASE)
    assert not decision.promote and decision.reasons[0] == "ndcg@10 0.410 <= champion 0.430 + margin 0.000"


def test_beating_the_champion_but_not_the_base_model_does_not_promote():
    """A champion worse than the base model (e.g. logged before the base was measured)."""
    decision = decide_promotion({"ndcg@10": 0.28}, {"ndcg@10": 0.20}, BASE)
    assert not decision.promote and decision.beats_champion and not decision.beats_base


def test_another_metric_can_be_chosen():
    decision = decide_promotion({"ndcg@10": 0.1, "hr@10": 0.6}, {"hr@10": 0.55}, BASE, metric="hr@10")
    assert decision.promote and decision.metric == "hr@10"
    assert decision.reasons[0] == "hr@10 0.600 >= champion 0.550 + margin 0.000"


@pytest.mark.parametrize("role, kwargs", [
    ("candidate", {"candidate": {"hr@10": 0.4}}),
    ("champion", {"champion": {"hr@10": 0.4}}),
    ("base model", {"base": {"hr@10": 0.4}}),
])
def test_a_missing_metric_is_a_clear_error(role, kwargs):
    args = {"candidate": {"ndcg@10": 0.4}, "champion": {"ndcg@10": 0.3}, "base": BASE, **kwargs}
    with pytest.raises(ValueError, match=rf"{role} metrics have no 'ndcg@10'.*keys: hr@10"):
        decide_promotion(**args)


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="candidate metrics ndcg@10 is NaN"):
        decide_promotion({"ndcg@10": math.nan}, None, BASE)
    with pytest.raises(ValueError, match="champion metrics ndcg@10 is not a number: 'high'"):
        decide_promotion({"ndcg@10": 0.4}, {"ndcg@10": "high"}, BASE)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        decide_promotion({"ndcg@10": 0.4}, None, BASE, margin=-0.01)
    with pytest.raises(ValueError, match="must be a dict of metrics"):
        decide_promotion([0.4], None, BASE)
    # numbers stored as strings (registry tags) are fine
    assert decide_promotion({"ndcg@10": "0.4"}, {"ndcg@10": "0.35"}, BASE).promote


# -- per-group metrics -----------------------------------------------------------------------


def _groups(ml_dense, ml_sparse, cds_dense, cds_sparse) -> dict:
    return {"ml-1m": {"dense": {"ndcg@10": ml_dense}, "sparse": {"ndcg@10": ml_sparse}},
            "amazon-cds": {"dense": {"ndcg@10": cds_dense}, "sparse": {"ndcg@10": cds_sparse}}}


def test_per_group_metrics_compare_the_unweighted_mean_over_the_groups():
    figure = metric_figure(_groups(0.4, 0.2, 0.3, 0.1))
    assert figure.value == pytest.approx(0.25) and figure.source == "mean over 4 groups"
    assert figure.groups == ("amazon-cds/dense", "amazon-cds/sparse", "ml-1m/dense", "ml-1m/sparse")
    decision = decide_promotion(_groups(0.4, 0.2, 0.3, 0.1), _groups(0.3, 0.2, 0.3, 0.1), _groups(0.1, 0.1, 0.1, 0.1))
    assert decision.promote and decision.candidate_value == pytest.approx(0.25)
    assert decision.champion_value == pytest.approx(0.225)
    assert decision.groups == list(figure.groups)
    assert decision.reasons[-1].startswith("ndcg@10 figures are unweighted means over the groups amazon-cds/dense")


def test_flat_group_keys_work_like_nested_ones():
    flat = {"ml-1m/dense": {"ndcg@10": 0.4}, "ml-1m/sparse": {"ndcg@10": 0.2}}
    assert metric_figure(flat).value == pytest.approx(0.3)
    assert metric_figure({"ml-1m/dense/ndcg@10": 0.4, "ml-1m/sparse/ndcg@10": 0.2}).value == pytest.approx(0.3)
    assert flatten_metrics({"a": {"b": {"ndcg@10": 1}}, "n": 2}) == {"a/b/ndcg@10": 1, "n": 2}


def test_an_overall_value_wins_over_the_groups():
    metrics = {"ndcg@10": 0.5, **_groups(0.1, 0.1, 0.1, 0.1)}
    assert metric_figure(metrics).value == 0.5 and metric_figure(metrics).groups == ()


def test_different_groups_are_not_compared():
    candidate = _groups(0.4, 0.2, 0.3, 0.1)
    champion = {"ml-1m": candidate["ml-1m"]}
    with pytest.raises(ValueError, match=r"different groups \(only the candidate: \['amazon-cds/dense'"):
        decide_promotion(candidate, champion, {"ndcg@10": 0.1})


def test_the_decision_serializes():
    decision = decide_promotion({"ndcg@10": 0.4}, None, BASE)
    assert isinstance(decision, PromotionDecision)
    assert decision.to_dict()["promote"] is True and decision.to_dict()["reasons"] == decision.reasons


# -- significance: the paired test against the champion --------------------------------------------


def _test(effect: float, p_value: float = 0.5, n: int = 200, half_width: float = 0.02):
    from recthinker_dagster.metrics import PairedTest

    return PairedTest(effect=effect, ci_low=effect - half_width, ci_high=effect + half_width, p_value=p_value,
                      n_tasks=n, n_resamples=10_000)


def test_a_significant_win_over_the_champion_promotes_and_records_the_test():
    decision = decide_promotion({"ndcg@10": 0.46}, {"ndcg@10": 0.43}, BASE, champion_version=2, level=0.05,
                                test=_test(0.03, 0.004))
    assert decision.promote and decision.beats_champion
    assert decision.reasons[0].startswith("ndcg@10 0.460 >= champion v2 0.430 + margin 0.000, significantly ")
    assert "p = 0.0040, 200 tasks" in decision.reasons[0]
    assert decision.level == 0.05 and decision.test["p_value"] == 0.004 and decision.test["n_tasks"] == 200


def test_a_better_but_not_significant_candidate_is_the_challenger_with_that_reason():
    decision = decide_promotion({"ndcg@10": 0.46}, {"ndcg@10": 0.43}, BASE, level=0.05, test=_test(0.03, 0.12))
    assert not decision.promote and decision.alias == "challenger" and decision.beats_champion is False
    assert "but not significantly" in decision.reasons[0] and "p = 0.1200" in decision.reasons[0]


def test_a_loss_is_the_challenger_whatever_the_test():
    decision = decide_promotion({"ndcg@10": 0.40}, {"ndcg@10": 0.43}, BASE, level=0.05, test=_test(-0.03, 0.99))
    assert not decision.promote and decision.reasons[0] == "ndcg@10 0.400 <= champion 0.430 + margin 0.000"


def test_without_a_champion_the_level_asks_for_no_test():
    decision = decide_promotion({"ndcg@10": 0.35}, None, BASE, level=0.05)
    assert decision.promote and decision.test is None


def test_a_test_that_could_not_run_never_promotes():
    decision = decide_promotion({"ndcg@10": 0.46}, {"ndcg@10": 0.43}, BASE, level=0.05,
                                untested="the champion was scored on other eval tasks")
    assert not decision.promote
    assert "could not run: the champion was scored on other eval tasks" in decision.reasons[0]
    with pytest.raises(ValueError, match="level must be in"):
        decide_promotion({"ndcg@10": 0.46}, None, BASE, level=1.5)


def test_the_gate_pairs_the_champion_task_by_task():
    from recthinker_dagster.serving.registry import paired_test

    rng = __import__("numpy").random.default_rng(0)
    champion = {f"ml-1m/{g}/ml-1m/eval/{i}": float(rng.random()) for g in ("sparse", "dense") for i in range(60)}
    better = {key: value + 0.1 + float(rng.normal(0, 0.05)) for key, value in champion.items()}
    test, why = paired_test(better, champion)
    assert why == "" and test.p_value < 0.001 and test.effect == pytest.approx(0.1, abs=0.02) and test.n_tasks == 120
    assert test.ci_low < test.effect < test.ci_high  # resampled within the two groups, not per task
    test, why = paired_test(better, {**champion, "ml-1m/dense/extra": 0.5})
    assert test is None and "scored on other eval tasks (120 shared of 120)" in why
    assert paired_test(better, None)[1].startswith("the champion has no per-task scores")


# -- the start policy: training must not break the policy it started from ----------------------------


def test_a_candidate_worse_than_its_start_beyond_noise_is_rejected_even_without_a_champion():
    # v17 of the demo: above the base model, far below the SFT policy it was trained from
    decision = decide_promotion({"ndcg@10": 0.46}, None, {"ndcg@10": 0.40}, start={"ndcg@10": 0.79},
                                start_test=_test(-0.325, n=20, half_width=0.15))
    assert not decision.promote and decision.beats_base and decision.keeps_start is False
    assert decision.start_value == 0.79 and decision.start_test["ci_high"] == pytest.approx(-0.175)
    assert "worse beyond noise" in decision.reasons[-1] and "broke the policy it started from" in decision.reasons[-1]


def test_a_candidate_within_noise_of_its_start_is_promoted():
    decision = decide_promotion({"ndcg@10": 0.77}, None, BASE, start={"ndcg@10": 0.79},
                                start_test=_test(-0.02, n=20, half_width=0.04))
    assert decision.promote and decision.keeps_start
    assert decision.reasons[-1] == ("ndcg@10 0.770 against the start policy's 0.790: not worse beyond noise "
                                    "(paired bootstrap effect -0.020 [-0.060, +0.020], 20 tasks)")


def test_without_a_paired_test_the_start_compares_means():
    assert decide_promotion({"ndcg@10": 0.79}, None, BASE, start={"ndcg@10": 0.79}).keeps_start
    decision = decide_promotion({"ndcg@10": 0.78}, None, BASE, start={"ndcg@10": 0.79})
    assert not decision.promote and "below the start policy's 0.790 (means: no paired test)" in decision.reasons[-1]
    assert decide_promotion({"ndcg@10": 0.78}, None, BASE).keeps_start is None  # no start: not compared


def test_the_gate_tests_the_candidate_against_its_start_task_by_task():
    from recthinker_dagster.serving.registry import paired_against_start

    tasks = [f"ml-1m/{g}/{i}" for g in ("sparse", "dense") for i in range(10)]
    record = {"candidate_per_task": dict.fromkeys(tasks, 0.4), "start_per_task": dict.fromkeys(tasks, 0.7)}
    test = paired_against_start(record)
    assert test.effect == pytest.approx(-0.3) and test.ci_high < 0 and test.n_tasks == 20
    assert paired_against_start({**record, "start_per_task": None}) is None  # an older record: no start
    assert paired_against_start({**record, "start_per_task": dict.fromkeys(tasks[:5], 0.7)}) is None  # other tasks


# -- the registered_model asset and the promotion_gate check --------------------------------------


def _fake_trained_project(project):
    """``project`` with an evaluation that scored sft_rl above base_tools, and empty model and index folders."""
    from recthinker_dagster.artifacts import index_folders

    layout = project.paths.layout
    tasks = layout.asset_dir("task_splits", "synthetic")
    tasks.mkdir(parents=True)
    pl.DataFrame({"user_id": ["7"], "candidate_item_ids": [[str(i) for i in range(8)]]}).write_parquet(
        tasks / "tasks_eval.parquet")
    for folder in [*index_folders(layout, "synthetic").values(), layout.asset_dir("base_model"),
                   layout.asset_dir("sft_model") / "adapter", layout.asset_dir("rl_model") / "adapter"]:
        folder.mkdir(parents=True)
    (layout.asset_dir("rl_model") / "lineage.json").write_text(json.dumps(
        {"base_model": "assets/base_model", "adapters": ["assets/sft_model/adapter", "assets/rl_model/adapter"]}))
    _write_evaluation(layout, SCORES)
    return project


SCORES = [0.2 + 0.6 * ((7 * i) % 10) / 10 for i in range(40)]  # sft_rl's NDCG@10 on 40 tasks per group


def _write_evaluation(layout, sft_rl_scores, base_shift=-0.2, sft_shift=None):
    """An evaluation folder whose summary and per-task rankings agree: sft_rl scores ``sft_rl_scores``
    on the same 40 tasks per group, base_tools ``base_shift`` away from it, and sft (only with
    ``sft_shift``) ``sft_shift`` away."""
    evaluation = layout.asset_dir("evaluation", "synthetic")
    evaluation.mkdir(parents=True, exist_ok=True)
    shifts = {"sft_rl": 0.0, "base_tools": base_shift} | ({} if sft_shift is None else {"sft": sft_shift})
    rows = [{"system": system, "group": group, "task_id": f"{group}-{i}", "in_llm_subset": True,
             "ndcg@10": score + shift}
            for system, shift in shifts.items() for group in ("sparse", "dense") for i, score in enumerate(sft_rl_scores)]
    rankings = pl.DataFrame(rows)
    rankings.write_parquet(evaluation / "rankings.parquet")
    rankings.group_by("system", "group").agg(pl.col("ndcg@10").mean()).with_columns(
        tasks=pl.lit("llm_subset")).write_parquet(evaluation / "summary.parquet")


def test_registered_model_and_promotion_gate(project):
    import dagster as dg
    from mlflow import MlflowClient

    from recthinker_dagster.defs.config import RegistryConfig
    from recthinker_dagster.defs.registry import build_registry_assets

    _fake_trained_project(project)

    def materialize(selection=None):
        ops = {} if selection else {"registered_model": RegistryConfig(profile="smoke")}
        result = dg.materialize(build_registry_assets(["synthetic"]), resources=project.resources,
                                selection=selection, instance=dg.DagsterInstance.ephemeral(),
                                run_config=dg.RunConfig(ops=ops))
        [gate] = result.get_asset_check_evaluations()
        return result, gate

    result, gate = materialize()
    metadata = result.asset_materializations_for_node("registered_model")[0].metadata
    assert metadata["model_uri"].value == "models:/recthinker-agent/1"
    mean = pytest.approx(sum(SCORES) / len(SCORES))
    assert metadata["candidate"].value == {"synthetic": {"sparse": {"ndcg@10": mean}, "dense": {"ndcg@10": mean}}}
    assert gate.passed and gate.metadata["alias"].value == "champion"
    record = json.loads((project.paths.asset_dir("registered_model") / "registration.json").read_text())
    assert record["version"] == "1" and record["adapters"] == ["assets/sft_model/adapter", "assets/rl_model/adapter"]

    # the gate again on the same version: nothing to decide
    _, gate = materialize(dg.AssetSelection.checks_for_assets(dg.AssetKey("registered_model")))
    assert gate.passed and gate.description == "version 1 is already the champion"

    # a second version with the same figures ties the champion: it becomes the challenger
    _, gate = materialize()
    assert not gate.passed and gate.metadata["alias"].value == "challenger"
    assert "ties champion v1" in gate.description
    client = MlflowClient(tracking_uri=project.tracking_uri)
    assert str(client.get_model_version_by_alias("recthinker-agent", "champion").version) == "1"
    assert client.get_model_version("recthinker-agent", "2").tags["promotion_decision"] == "rejected"

    # a third, better on one task per group and worse on another: better on average, but not significantly
    _write_evaluation(project.paths.layout, [SCORES[0] + 0.3, SCORES[1] - 0.2, *SCORES[2:]])
    _, gate = materialize()
    assert not gate.passed and gate.metadata["alias"].value == "challenger"
    assert "but not significantly" in gate.description
    tags = client.get_model_version("recthinker-agent", "3").tags
    assert tags["promotion_test"].startswith("paired bootstrap") and tags["promotion_tasks"] == "80"
    assert float(tags["promotion_p_value"]) >= 0.05 and float(tags["promotion_effect"]) == pytest.approx(0.1 / 40)

    # a fourth, 0.1 better on every task: a significant win over the champion's own per-task scores
    _write_evaluation(project.paths.layout, [score + 0.1 for score in SCORES])
    _, gate = materialize()
    assert gate.passed and gate.metadata["alias"].value == "champion" and "significantly (" in gate.description
    tags = client.get_model_version("recthinker-agent", "4").tags
    assert tags["promotion_decision"] == "promoted" and tags["compared_champion_version"] == "1"
    assert float(tags["promotion_p_value"]) < 0.05 and float(tags["promotion_effect"]) == pytest.approx(0.1)
    assert str(client.get_model_version_by_alias("recthinker-agent", "champion").version) == "4"
    assert tags["promotion_start_value"] == "none"  # the evaluation scored no SFT policy

    # a fifth, a significant win over the champion, but 0.2 below the SFT policy it was trained from
    _write_evaluation(project.paths.layout, [score + 0.3 for score in SCORES], sft_shift=0.2)
    _, gate = materialize()
    assert not gate.passed and gate.metadata["alias"].value == "challenger"
    assert "training broke the policy it started from" in gate.description
    tags = client.get_model_version("recthinker-agent", "5").tags
    assert float(tags["promotion_start_value"]) == pytest.approx(sum(SCORES) / len(SCORES) + 0.5)
    assert json.loads(tags["promotion_start_effect_ci"]) == [pytest.approx(-0.2), pytest.approx(-0.2)]
    assert str(client.get_model_version_by_alias("recthinker-agent", "champion").version) == "4"
