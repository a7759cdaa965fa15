"""Materialize chosen assets from the command line with a profile's config (``recthinker materialize``).

    result = materialize_assets(["rl_model", "ml_1m/evaluation"], "demo")

``dagster asset materialize --select`` and ``dg launch --assets`` parse their selection string
with a grammar generated for antlr4 4.13, while DVC (through hydra-core and omegaconf) pins
the antlr4 runtime to 4.9, so in this environment that parser fails with ``TypeError: ord()
expected string of length 1, but int found``. This takes asset keys (``a/b`` paths) instead, runs
them in the first of the profile's jobs (``pipeline_<profile>``, ``think_<profile>``) that holds
them all, with that job's config, and records the run in the Dagster instance (the UI shows it).
``--job`` names the job instead: ``recthinker materialize ml_1m/evaluation --job headline_demo``
re-scores one dataset's headline table with the headline job's config (``dagster job execute
-j headline_demo -o ml_1m__evaluation`` runs that op without the job's config).
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


def job_for(defs: dg.Definitions, keys: Sequence[dg.AssetKey], profile: str,
            job_name: str | None = None) -> dg.JobDefinition:
    """The job ``job_name`` when given (e.g. ``headline_demo``, whose evaluation config scores
    every system), else the first of the profile's jobs that holds every key; an error that
    lists the known jobs or keys otherwise."""
    if job_name is not None:
        return named_job(defs, keys, job_name)
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


def named_job(defs: dg.Definitions, keys: Sequence[dg.AssetKey], job_name: str) -> dg.JobDefinition:
    names = sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__"))
    if job_name not in names:
        raise UnknownAssets(f"unknown job {job_name!r}; the jobs are: {', '.join(names)}")
    job = defs.resolve_job_def(job_name)
    held = set(job.asset_layer.selected_asset_keys)
    missing = sorted(key.to_user_string() for key in keys if key not in held)
    if missing:
        listed = ", ".join(sorted(key.to_user_string() for key in held))
        raise UnknownAssets(f"job {job_name!r} does not hold {missing}; its assets are: {listed}")
    return job


def materialize_assets(names: Sequence[str], profile: str, job_name: str | None = None) -> dg.ExecuteInProcessResult:
    """Run the assets ``names`` (in dependency order, upstream assets not re-run) in this process,
    in the job ``job_name`` (with its config) or the profile's job that holds them."""
    from recthinker_dagster.definitions import defs

    keys = asset_keys(names)
    job = job_for(defs, keys, profile, job_name)
    if not os.environ.get("DAGSTER_HOME"):  # as scripts/run_pipeline.sh: the project's own instance
        home = Path(default_project_root()) / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home.resolve())
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(instance=instance, asset_selection=keys, raise_on_error=False)
