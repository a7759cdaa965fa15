#!/usr/bin/env bash
# Set everything up, then run the test suite (offline: tests read the local datasets).
#
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RECTHINKER_OFFLINE=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/python -m pytest "$@"
