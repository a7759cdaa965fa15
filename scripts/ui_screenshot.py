"""Screenshot the Dagster asset graph: start the real webserver, open it in headless Chromium.

    .venv/bin/python scripts/ui_screenshot.py                       # -> docs/images/dagster_asset_graph.png
    .venv/bin/python scripts/ui_screenshot.py --datasets synthetic --out graph.png

Starts ``dagster-webserver`` on 127.0.0.1 (a free port) against workspace.yaml with a
temporary DAGSTER_HOME (or ``--dagster-home``, to show a real instance's materializations),
opens the global asset lineage page in Debian's Chromium (``/usr/bin/chromium``, driven by
Playwright; no downloaded browser), expands every asset group, enlarges the window until
asset names are drawn in full, and saves a PNG. The graph shows the default datasets when
their files are under data/, else the built-in synthetic dataset.

tests/test_ui.py uses the same helpers.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (scripts/setup.sh installs it)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Pipeline assets every dataset has; the graph is only drawn when they show up.
PIPELINE_ASSETS = ("raw_dataset", "task_splits", "tool_suite", "teacher_trajectories", "base_model")
# Dagster draws nodes in "minimal" form (names shortened to 18 characters) below this zoom.
FULL_NAME_SCALE = 0.62
MAX_VIEWPORT = (3600, 6000)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def webserver(datasets: list[str], dagster_home: Path | None = None, log_path: Path | None = None,
              timeout_s: float = 300):
    """Run ``dagster-webserver`` for this repo's code location; yield its base URL.

    The server runs in its own session, and its whole process group (webserver and code
    server) is killed on exit.
    """
    with tempfile.TemporaryDirectory(prefix="recthinker-ui-") as scratch:
        home = Path(dagster_home) if dagster_home else Path(scratch) / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        log_path = Path(log_path) if log_path else Path(scratch) / "webserver.log"
        port = free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home.resolve()),
            "RECTHINKER_DATASETS": ",".join(datasets),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        command = [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"dagster-webserver exited with {process.returncode}:\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dagster-webserver did not answer in {timeout_s:.0f} s:\n{_tail(log_path)}")
                time.sleep(1)
            yield base_url
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000):
    """A Playwright page in headless Debian Chromium."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            # Dismiss the first-visit "join the community" dialog before it opens.
            context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
            yield context.new_page()
        finally:
            browser.close()


def _graph_fit(page) -> dict:
    """How the lineage graph is drawn: its zoom, and how far it overflows the graph pane."""
    return page.evaluate("""() => {
      const svg = document.querySelector("svg[class*='svgContainer']");
      const pane = svg.closest('[data-svg-viewport]').getBoundingClientRect();
      const box = svg.getBoundingClientRect();
      const width = Number(svg.getAttribute('width')), height = Number(svg.getAttribute('height'));
      return {scale: box.width / width, width, height, box_width: box.width, box_height: box.height,
              overflow_x: Math.max(0, pane.left - box.left) + Math.max(0, box.right - pane.right),
              overflow_y: Math.max(0, pane.top - box.top) + Math.max(0, box.bottom - pane.bottom)};
    }""")


def _wait_for_node_status(page, timeout_ms: float = 60_000) -> None:
    """Give the nodes' status rows time to replace their "Loading..." placeholders."""
    deadline = time.monotonic() + timeout_ms / 1000
    while page.get_by_text("Loading...").count() and time.monotonic() < deadline:
        page.wait_for_timeout(500)


def show_asset_graph(page, base_url: str, names=PIPELINE_ASSETS, timeout_s: float = 300) -> dict:
    """Open the global asset lineage with every group expanded, zoomed so names are legible.

    Returns {"url", "scale", "viewport", "visible": {name: bool}}.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    timeout_ms = timeout_s * 1000
    page.goto(f"{base_url}/asset-groups", wait_until="domcontentloaded", timeout=timeout_ms)
    try:  # more room for the graph
        page.get_by_role("button", name="Hide navigation").click(timeout=30_000)
    except PlaywrightTimeout:
        pass
    # With several groups Dagster draws them collapsed; Alt+E expands all (kept in the URL).
    asset_node, group_node = "[class*='AssetNode_assetName']", "[class*='CollapsedGroupNode_collapsedGroupNodeBox']"
    page.wait_for_selector(f"{asset_node}, {group_node}", timeout=timeout_ms)
    if page.locator(asset_node).count() == 0:
        page.keyboard.press("Alt+KeyE")
    page.wait_for_selector(asset_node, timeout=timeout_ms)

    # Dagster zooms to fit on load: enlarge the window (and reload) until that zoom draws
    # nodes in full and the whole graph lies inside the pane.
    for _ in range(4):
        fit = _graph_fit(page)
        grow_w, grow_h = fit["overflow_x"], fit["overflow_y"]
        if fit["scale"] < FULL_NAME_SCALE:
            grow_w += fit["width"] * FULL_NAME_SCALE - fit["box_width"]
            grow_h += fit["height"] * FULL_NAME_SCALE - fit["box_height"]
        viewport = page.viewport_size
        new = {
            "width": int(min(MAX_VIEWPORT[0], viewport["width"] + (grow_w + 40 if grow_w > 1 else 0))),
            "height": int(min(MAX_VIEWPORT[1], viewport["height"] + (grow_h + 40 if grow_h > 1 else 0))),
        }
        if new == viewport:
            break
        page.set_viewport_size(new)
        page.reload(wait_until="domcontentloaded", timeout=timeout_ms)
        page.wait_for_selector(asset_node, timeout=timeout_ms)
    _wait_for_node_status(page)
    visible = {}
    for name in names:
        label = page.get_by_text(name, exact=True).first
        try:
            label.wait_for(state="visible", timeout=timeout_ms)
            visible[name] = True
        except PlaywrightTimeout:
            visible[name] = False
    return {"url": page.url, "scale": _graph_fit(page)["scale"], "viewport": page.viewport_size, "visible": visible}


def default_datasets_present() -> bool:
    from recthinker_dagster.data.errors import DatasetNotFoundError
    from recthinker_dagster.data.sources import dataset_files
    from recthinker_dagster.definitions import DEFAULT_DATASETS
    from recthinker_dagster.defs.resources import ProjectPaths

    data_dir = ProjectPaths().data_path
    try:
        for name in DEFAULT_DATASETS:
            dataset_files(name, data_dir, allow_download=False)
    except DatasetNotFoundError:
        return False
    return True


def _shrink_png(path: Path) -> None:
    """Store the screenshot with a 256-colour palette: the UI is nearly grey, the file a third."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images" / "dagster_asset_graph.png")
    parser.add_argument("--datasets",
                        help="comma-separated; default: ml-1m,amazon-cds when their data is present, else synthetic")
    parser.add_argument("--dagster-home", type=Path,
                        help="show this instance's runs and materializations (default: an empty one)")
    args = parser.parse_args()

    if args.datasets:
        datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    else:
        from recthinker_dagster.definitions import DEFAULT_DATASETS

        datasets = list(DEFAULT_DATASETS) if default_datasets_present() else ["synthetic"]
    started = time.perf_counter()
    with webserver(datasets, dagster_home=args.dagster_home) as base_url, chromium_page() as page:
        result = show_asset_graph(page, base_url)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
    _shrink_png(args.out)
    missing = [name for name, shown in result["visible"].items() if not shown]
    print(f"datasets {','.join(datasets)}: zoom {result['scale']:.2f}, window {result['viewport']}, "
          f"{time.perf_counter() - started:.0f} s -> {args.out}")
    if missing:
        sys.exit(f"not visible in the asset graph: {missing}")


if __name__ == "__main__":
    main()
