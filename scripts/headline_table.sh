#!/usr/bin/env bash
# The headline table: every system on the same eval tasks, written to docs/results.md.
#
#   bash scripts/headline_table.sh [smoke|demo|full]     (default: demo)
#
# Runs what is missing first: the pipeline (scripts/run_pipeline.sh) when no trained agent is
# published, and the think job (RecZero, RecOne) when its policies are not. Then the
# headline_<profile> job scores every system (the trained agents in both answer modes) on the
# profile's headline task count, and `recthinker report` writes the document from the saved
# per-task rankings. On a 2-core CPU the demo profile's headline takes hours (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-${RECTHINKER_PROFILE:-demo}}
OUT=${RECTHINKER_RESULTS:-docs/results.md}
if [ ! -d assets/rl_model/adapter ]; then
    bash scripts/run_pipeline.sh "$PROFILE"
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export DAGSTER_HOME=${DAGSTER_HOME:-$(pwd)/dagster_home}
if [ ! -d assets/reczero_model/adapter ] || [ ! -d assets/recone_model/adapter ]; then
    echo "[headline] dagster job execute -j think_$PROFILE"
    .venv/bin/dagster job execute -m recthinker_dagster.definitions -j "think_$PROFILE"
fi
echo "[headline] dagster job execute -j headline_$PROFILE"
.venv/bin/dagster job execute -m recthinker_dagster.definitions -j "headline_$PROFILE"
.venv/bin/recthinker report --out "$OUT" --produced-by "bash scripts/headline_table.sh $PROFILE"
