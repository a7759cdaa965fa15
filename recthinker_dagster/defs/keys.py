"""Asset keys, in one place: every ``defs`` module names its neighbours' assets from here."""

from __future__ import annotations

import dagster as dg

from recthinker_dagster.artifacts import key_prefix

BASE_MODEL = dg.AssetKey("base_model")
FILTERED_TRAJECTORIES = dg.AssetKey("filtered_trajectories")
SFT_MODEL = dg.AssetKey("sft_model")
RL_MODEL = dg.AssetKey("rl_model")
REGISTERED_MODEL = dg.AssetKey("registered_model")
AGENT_GROUP = "agent"  # the cross-dataset training and registry assets
# the concurrency pool of the CPU/GPU-heavy stages (training, the LLM evaluation): with the
# instance's limit for it (`dagster instance concurrency set recthinker_heavy 1`, which
# scripts/run_pipeline.sh sets for parallel executors) they never overlap, while the light
# per-dataset branches run in parallel (docs/deploy.md)
HEAVY_POOL = "recthinker_heavy"


def dataset_key(dataset: str, asset: str) -> dg.AssetKey:
    """``ml_1m/<asset>``: the key of a per-dataset asset."""
    return dg.AssetKey([key_prefix(dataset), asset])


def dataset_keys(datasets: list[str], asset: str) -> list[dg.AssetKey]:
    return [dataset_key(d, asset) for d in datasets]
