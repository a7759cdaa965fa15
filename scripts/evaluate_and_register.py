"""Re-run only the evaluation of every dataset and the registration (with its promotion gate),
on the trained models already under ``assets/``: the tail of the pipeline after ``rl_model``.

    DAGSTER_HOME=$PWD/dagster_home OMP_WAIT_POLICY=PASSIVE \\
        .venv/bin/python scripts/evaluate_and_register.py --profile demo --llm-tasks 4

The run is a normal Dagster run (it shows in the UI when ``DAGSTER_HOME`` is the project's).
"""

from __future__ import annotations

import argparse
import time

import dagster as dg

from recthinker_dagster.definitions import build_definitions
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import EvaluationConfig, RegistryConfig
from recthinker_dagster.settings import default_profile_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=default_profile_name(), help="profiles/<name>.yaml (default: %(default)s)")
    parser.add_argument("--llm-tasks", type=int, help="eval tasks per dataset for the LLM systems (profile default)")
    parser.add_argument("--margin", type=float, help="promotion margin over the champion (profile default)")
    args = parser.parse_args()

    started = time.time()
    defs = build_definitions()
    evaluations = [key for key in defs.resolve_asset_graph().get_all_asset_keys() if key.path[-1] == "evaluation"]
    ops = {f"{key.path[0]}__evaluation": EvaluationConfig(profile=args.profile, llm_tasks=args.llm_tasks)
           for key in evaluations}
    ops["registered_model"] = RegistryConfig(profile=args.profile, margin=args.margin)
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets(*evaluations, keys.REGISTERED_MODEL)
        | dg.AssetSelection.checks_for_assets(keys.REGISTERED_MODEL),
        run_config=dg.RunConfig(ops=ops),
        instance=dg.DagsterInstance.get(),
        resources=defs.resources,
        raise_on_error=False,
    )
    for check in result.get_asset_check_evaluations():
        print(f"{check.check_name}: {'passed' if check.passed else 'not passed'}: {check.description}")
    print(f"{'success' if result.success else 'FAILED'} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
