"""The mask editor in a real browser: JupyterLab + headless Chromium, real mouse events.

Opens ``notebooks/02_draw_region.ipynb`` (a scratch copy) in JupyterLab, runs the cells up to
the editor, draws a stroke over the lips with the mouse, and checks that the stroke reached the
kernel's NumPy mask and, through the Save button, the mask file — including the overwrite
confirmation. Skipped when Chromium (Debian package ``chromium``) or the ``playwright`` package
is missing. Set ``COCAM_WIDGET_SCREENSHOT=<path.png>`` to keep a screenshot of the widget.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cocam.masks import load_mask

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--no-first-run"]
SCALE = 3  # the notebook's MaskEditor(scale=3)
BRUSH = 10  # and brush_size=10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a scratch copy of the project: ``(url, project folder)``."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install 'cocam[notebooks]')")
    pytest.importorskip("ipycanvas", reason="ipycanvas is not installed (pip install 'cocam[notebooks]')")
    project = tmp_path / "project"
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    (project / "pyproject.toml").write_text("")
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"), IPYTHONDIR=str(tmp_path / "ipython"),
               COCAM_SMOKE="1", COCAM_PROJECT_DIR=str(project))
    port = _free_port()
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.token=", "--ServerApp.password=", "--allow-root", f"--ServerApp.root_dir={project}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=project)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, project
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def _run_code_cells_until(page, marker: str, n_code: int) -> None:
    """Run the notebook's code cells in order, up to the first one whose source contains ``marker``.

    Each cell is selected with a click on its prompt and run with Ctrl+Enter; the click is
    repeated if the run did not start (JupyterLab may still be settling right after loading).
    """
    cells = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell")
    page.wait_for_function(  # the notebook renders progressively: wait for all its code cells
        f"() => document.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell').length >= {n_code}")
    for i in range(n_code):
        cell = cells.nth(i)
        prompt = cell.locator(".jp-InputArea-prompt")
        for _attempt in range(6):
            cell.scroll_into_view_if_needed()
            prompt.click()
            page.keyboard.press("Control+Enter")
            try:
                page.wait_for_function("el => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(),
                                       timeout=5_000)
                break
            except Exception:  # playwright's TimeoutError: not started yet, try again
                page.wait_for_timeout(1_000)
        else:
            pytest.fail(f"code cell {i} could not be started")
        page.wait_for_function("el => /\\[\\d+\\]/.test(el.textContent)", arg=prompt.element_handle(),
                               timeout=180_000)
        if cell.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").count():
            pytest.fail(f"code cell {i} raised:\n{cell.inner_text()}")
        if marker in cell.locator(".jp-InputArea-editor").inner_text():
            return
    pytest.fail(f"no code cell contains {marker!r}")


def _count_code_cells(path: Path) -> int:
    import json

    return sum(c["cell_type"] == "code" for c in json.loads(path.read_text(encoding="utf-8"))["cells"])


def _pixels(mask: np.ndarray, start: tuple[float, float], stop: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every template pixel centre to the segment start→stop (template coordinates)."""
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]] + 0.5
    (x0, y0), (x1, y1) = start, stop
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - x0 - t * dx, yy - y0 - t * dy), mask


# Playwright matches a plain-string has_text case-insensitively as a substring, so "Saved" would also
# match the "not saved" the status shows before the click; a regular expression is case-sensitive.
SAVED = re.compile(r"\bSaved ")


def test_drawing_with_the_mouse_reaches_the_kernel_and_the_file(jupyterlab, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    url, project = jupyterlab
    mask_file = project / "runs" / "notebooks" / "smoke" / "masks" / "Wearing_Lipstick.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/notebooks/02_draw_region.ipynb")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell.jp-CodeCell")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            _run_code_cells_until(page, "MaskEditor(", _count_code_cells(ROOT / "notebooks" / "02_draw_region.ipynb"))

            status = page.locator(".cocam-mask-status")
            status.wait_for()
            canvas = page.locator("canvas.cocam-mask-canvas").last
            canvas.wait_for(state="visible")
            canvas.scroll_into_view_if_needed()
            page.wait_for_timeout(1_000)  # let the layout settle before measuring
            box = canvas.bounding_box()
            assert box is not None and box["width"] > 100
            sx, sy = box["width"] / (178 * SCALE), box["height"] / (218 * SCALE)

            def at(tx: float, ty: float) -> tuple[float, float]:
                return box["x"] + tx * SCALE * sx, box["y"] + ty * SCALE * sy

            # 1. a stroke across the lips, with real mouse events
            start, stop = (62.0, 150.0), (116.0, 151.0)
            page.mouse.move(*at(*start))
            page.mouse.down()
            page.mouse.move(*at(*stop), steps=25)
            page.mouse.up()
            page.locator(".cocam-mask-status", has_text=re.compile(r"[1-9]\d* px")).wait_for()
            assert "not saved" in status.inner_text()
            assert not mask_file.exists()

            # 2. saved through the Save button: the kernel's mask is what reaches the file
            page.locator(".cocam-mask-save").click()
            page.locator(".cocam-mask-status", has_text=SAVED).wait_for()
            assert mask_file.is_file()
            mask = load_mask(mask_file)
            distance, _ = _pixels(mask, start, stop)
            radius = BRUSH / 2
            assert mask[distance <= radius - 1.5].all(), "pixels along the stroke are missing"
            assert not mask[distance > radius + 1.5].any(), "pixels far from the stroke are painted"
            shown = int(re.search(r"(\d+) px", status.inner_text()).group(1))
            assert shown == int(mask.sum())

            # 3. a second stroke; Save refuses to replace the file until 'overwrite' is ticked
            page.mouse.move(*at(70, 160))
            page.mouse.down()
            page.mouse.move(*at(108, 160), steps=10)
            page.mouse.up()
            page.locator(".cocam-mask-status", has_text="not saved").wait_for()
            page.locator(".cocam-mask-save").click()
            page.locator(".cocam-mask-status", has_text="already exists").wait_for()
            assert np.array_equal(load_mask(mask_file), mask)
            page.locator(".cocam-mask-overwrite input").check()
            page.locator(".cocam-mask-save").click()
            page.locator(".cocam-mask-status", has_text=SAVED).wait_for()
            updated = load_mask(mask_file)
            assert (updated >= mask).all() and updated[160, 75:104].all()
            # the tick is per save: the kernel clears it (a widget message that may trail the status)
            page.locator(".cocam-mask-overwrite input:not(:checked)").wait_for(timeout=10_000)

            page.mouse.move(*at(128, 112))  # show the brush outline in the screenshot
            page.wait_for_timeout(500)
            shot = tmp_path / "widget.png"
            page.locator(".cocam-mask-editor").screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            keep = os.environ.get("COCAM_WIDGET_SCREENSHOT")
            if keep:
                Path(keep).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, keep)
        finally:
            browser.close()
