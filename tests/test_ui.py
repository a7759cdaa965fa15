"""The real Dagster UI, driven by headless Chromium: the asset graph and the automation show up.

Starts ``dagster-webserver`` (127.0.0.1, a free port, a temporary DAGSTER_HOME) on this
repo's code location with the synthetic dataset, and opens it with Playwright in Debian's
``/usr/bin/chromium`` (scripts/setup.sh installs it). Nothing leaves the machine.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")

MISSING = f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does, as root)"
# CI sets RECTHINKER_REQUIRE_UI=1: there a failed Chromium install fails these tests, never skips them
REQUIRED = os.environ.get("RECTHINKER_REQUIRE_UI") == "1"

pytestmark = [
    pytest.mark.slow,  # starts the Dagster webserver
    pytest.mark.skipif(not CHROMIUM.exists() and not REQUIRED, reason=MISSING),
]


@pytest.fixture(autouse=True)
def _chromium_present():
    if not CHROMIUM.exists():
        pytest.fail(f"{MISSING} (RECTHINKER_REQUIRE_UI=1)")


def _ui_helpers(repo_root: Path):
    spec = importlib.util.spec_from_file_location("ui_screenshot", repo_root / "scripts" / "ui_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_asset_graph_and_automation_render_in_the_dagster_ui(tmp_path, repo_root):
    ui = _ui_helpers(repo_root)
    log = tmp_path / "webserver.log"
    screenshot = tmp_path / "asset_graph.png"
    names = ("raw_dataset", "task_splits", "tool_suite", "teacher_trajectories", "evaluation", "base_model")
    with ui.webserver(["synthetic"], dagster_home=tmp_path / "dagster_home", log_path=log) as base_url:
        with urllib.request.urlopen(f"{base_url}/server_info", timeout=30) as response:
            assert b"dagster_webserver_version" in response.read()
        with ui.chromium_page() as page:
            result = ui.show_asset_graph(page, base_url, names=names)
            page.screenshot(path=str(screenshot))
            assert result["visible"] == {name: True for name in names}, (result, log.read_text()[-3000:])
            assert "/asset-groups" in result["url"]
            assert result["scale"] >= 0.6  # nodes drawn in full, names not shortened

            # The schedule and sensors are listed (and off until switched on).
            page.goto(f"{base_url}/automation", wait_until="domcontentloaded")
            for name in ("weekly_retraining", "raw_data_changed", "pipeline_failure_alert"):
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=120_000)

    with pytest.raises(OSError):  # the whole process group is gone
        urllib.request.urlopen(f"{base_url}/server_info", timeout=5)
    width, height = _png_size(screenshot)
    assert width >= 1600 and height >= 1000
    assert screenshot.stat().st_size > 50_000  # a drawn graph, not a blank page
