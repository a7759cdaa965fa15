"""Materialize chosen assets from the command line with a profile's config (``recthinker materialize``).

    result = materialize_assets(["rl_model", "ml_1m/evaluation"], "demo")

``dagster asset materialize --select`` and ``dg launch --assets`` parse their selection string
with a grammar generated for antlr4 4.13, while DVC (through hydra-core and omegaconf) pins
the antlr4 runtime to 4.9, so in this environment that parser fails with ``TypeError: ord()
expected string of length 1, but int found``. This takes asset keys (``a/b`` paths) instead, runs
them in the first of the profile's jobs (``pipeline_<profile>``, ``think_<profile>``) that holds
them all, with that job's config, and records the run in the Dagster instance (the UI shows it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from recthinker_dagster.defs.resources import default_project_root

JOB_FAMILIES = ("pipeline", "think")


class UnknownAssets(ValueError):
    pass


def asset_keys(names: Sequence[str]) -> list[dg.AssetKey]:
    return [dg.AssetKey(name.strip("/").split("/")) for name in names]


def job_for(defs: dg.Definitions, keys: Sequence[dg.AssetKey], profile: str) -> dg.JobDefinition:
    """The first of the profile's jobs that holds every key; an error that lists the known keys otherwise."""
    known: set[dg.AssetKey] = set()
    for family in JOB_FAMILIES:
        job = defs.resolve_job_def(f"{family}_{profile}")
        held = set(job.asset_layer.selected_asset_keys)
        if set(keys) <= held:
            return job
        known |= held
    missing = sorted(key.to_user_string() for key in keys if key not in known)
    listed = ", ".join(sorted(key.to_user_string() for key in known))
    if missing:
        raise UnknownAssets(f"unknown asset(s) {missing}; the {profile!r} profile's assets are: {listed}")
    raise UnknownAssets(f"{[k.to_user_string() for k in keys]} are not all in one of the jobs "
                        f"{[f'{family}_{profile}' for family in JOB_FAMILIES]}: materialize them one job at a time")


def materialize_assets(names: Sequence[str], profile: str) -> dg.ExecuteInProcessResult:
    """Run the assets ``names`` (in dependency order, upstream assets not re-run) in this process."""
    from recthinker_dagster.definitions import defs

    keys = asset_keys(names)
    job = job_for(defs, keys, profile)
    if not os.environ.get("DAGSTER_HOME"):  # as scripts/run_pipeline.sh: the project's own instance
        home = Path(default_project_root()) / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home.resolve())
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(instance=instance, asset_selection=keys, raise_on_error=False)
