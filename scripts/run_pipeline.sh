#!/usr/bin/env bash
# Set everything up, then materialize the whole pipeline with one profile.
#
#   bash scripts/run_pipeline.sh [smoke|demo|full]     (default: demo)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-${RECTHINKER_PROFILE:-demo}}
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export DAGSTER_HOME=${DAGSTER_HOME:-$(pwd)/dagster_home}
if [ "${RECTHINKER_EXECUTOR:-in_process}" != in_process ]; then
  # parallel steps: the heavy stages (training, the LLM evaluation) still run one at a time
  .venv/bin/dagster instance concurrency set recthinker_heavy "${RECTHINKER_HEAVY_LIMIT:-1}"
fi
echo "[run] dagster job execute -j pipeline_$PROFILE"
.venv/bin/dagster job execute -m recthinker_dagster.definitions -j "pipeline_$PROFILE"
