"""Asset versions pushed to an S3 bucket and restored from it: DVC's S3 remote (``dvc-s3``)
against a real S3 API on loopback (moto in server mode), configured as ``scripts/setup.sh``
configures ``$RECTHINKER_DVC_REMOTE``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.project import make_project
from tests.support.scoring_server import free_port, http, wait_until_ready

BUCKET = "recthinker"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
pytestmark = pytest.mark.slow


@pytest.fixture()
def s3_endpoint(tmp_path, monkeypatch):
    """moto's S3 on a free loopback port, with one empty bucket; its endpoint URL."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return http(f"{endpoint}/moto-api/", timeout=2)[0] < 500
        except OSError:
            return False

    try:
        wait_until_ready(process, answers, tmp_path / "moto.log", "moto's S3 server", 60)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def test_asset_versions_round_trip_through_an_s3_remote(s3_endpoint, tmp_path):
    from dvc.repo import Repo

    project = make_project(tmp_path / "project")
    with Repo(str(project.root)) as repo, repo.config.edit() as conf:  # what setup.sh does with $RECTHINKER_DVC_REMOTE
        conf["remote"]["shared"] = {"url": f"s3://{BUCKET}/dvc", "endpointurl": s3_endpoint}
        conf["core"]["remote"] = "shared"
    folder = project.root / "assets" / "tool_suite" / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"version": 1}))
    dvc = project.resources["dvc"]
    first = dvc.track(folder)
    pushed = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert pushed and all(key.startswith("dvc/") for key in pushed)
    assert not (project.root / "dvc_remote").exists()  # nothing went to the local remote

    (folder / "index.json").write_text(json.dumps({"version": 2}))
    second = dvc.track(folder)
    assert second["md5"] != first["md5"]
    shutil.rmtree(project.root / ".dvc" / "cache")  # this machine loses every cached version
    dvc.restore(folder, first["md5"])
    assert json.loads((folder / "index.json").read_text()) == {"version": 1}  # pulled back from the bucket
