"""``recthinker materialize``: asset keys to the profile's job that holds them, and clear errors."""

from __future__ import annotations

import dagster as dg
import pytest

from recthinker_dagster.cli import main
from recthinker_dagster.definitions import defs
from recthinker_dagster.defs.materialize import UnknownAssets, asset_keys, job_for


def test_asset_keys_are_slash_paths():
    assert asset_keys(["rl_model", "ml_1m/evaluation"]) == [dg.AssetKey("rl_model"), dg.AssetKey(["ml_1m", "evaluation"])]


def test_each_asset_runs_in_the_profile_job_that_holds_it():
    assert job_for(defs, asset_keys(["rl_model", "ml_1m/evaluation"]), "smoke").name == "pipeline_smoke"
    assert job_for(defs, asset_keys(["reczero_model"]), "demo").name == "think_demo"


def test_unknown_assets_and_assets_of_two_jobs_are_clear_errors(capsys):
    with pytest.raises(UnknownAssets, match=r"unknown asset\(s\) \['ml_1m/nope'\].*ml_1m/evaluation"):
        job_for(defs, asset_keys(["ml_1m/nope"]), "smoke")
    with pytest.raises(UnknownAssets, match="not all in one of the jobs"):
        job_for(defs, asset_keys(["rl_model", "reczero_model"]), "smoke")
    assert main(["materialize", "ml_1m/nope", "--profile", "smoke"]) == 2
    assert "unknown asset(s) ['ml_1m/nope']" in capsys.readouterr().err
    assert main(["materialize", "rl_model", "--profile", "huge"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_a_named_job_runs_the_assets_with_its_own_config(capsys):
    assert job_for(defs, asset_keys(["ml_1m/evaluation"]), "demo", "headline_demo").name == "headline_demo"
    with pytest.raises(UnknownAssets, match=r"unknown job 'headline_huge'; the jobs are: .*headline_demo"):
        job_for(defs, asset_keys(["ml_1m/evaluation"]), "demo", "headline_huge")
    with pytest.raises(UnknownAssets, match=r"job 'headline_demo' does not hold \['rl_model'\]"):
        job_for(defs, asset_keys(["rl_model"]), "demo", "headline_demo")
    assert main(["materialize", "rl_model", "--job", "headline_demo"]) == 2
    assert "does not hold ['rl_model']" in capsys.readouterr().err
