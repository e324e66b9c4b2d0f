"""The run page of a real ``mlflow server``, opened in headless Chromium (skipped where /usr/bin/chromium is
absent; CI installs Debian's ``chromium``): the loss charts and the sample image are there, in the
model-training view the run's link opens.

One Chromium run reads the page both ways: its DOM after the scripts ran (``--dump-dom``), which the
assertions use, and a screenshot of the same render (``run_page.png`` in the test's folder) for a person
to look at.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from flashdmd.config import load_config
from flashdmd.infra.tracking import open_tracker

CHROMIUM = "/usr/bin/chromium"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} is not installed")]


def chromium(url: str, shot: Path) -> str:
    """The DOM of ``url`` as headless Chromium renders it (``--dump-dom``); the same render goes to ``shot``."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--window-size=1600,2400", "--virtual-time-budget=150000",  # virtual time: charts load lazily
           "--dump-dom", f"--screenshot={shot}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=shot.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_run_page_shows_the_loss_charts_and_the_sample_image(tmp_path: Path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg = load_config("tiny-sdxl", [f"run_root={tmp_path / 'runs'}", "name=ui", f"tracking.uri={server.uri}"])
        tracker = open_tracker(cfg, 0, None, flush_interval_s=0.1, system_metrics_s=0)
        for step in range(0, 6):
            tracker.log_metrics({"loss/dmd": 1.0 / (step + 1), "loss/fake": 2.0 / (step + 1), "perf/step_s": 0.1}, step)
        images = torch.linspace(-1, 1, 3 * 3 * 16 * 16).reshape(3, 3, 16, 16)
        for step in (0, 5):
            tracker.log_images("generator", images * (step + 1) / 6, step, captions=["a cat", "a car", "fruit"])
        tracker.close()
        page = tracker.page
        assert page and page.startswith(server.uri) and page.endswith("?workflowType=machine_learning")
        run = MlflowClient(server.uri).get_run(tracker.run_id)
        assert run.info.status == "FINISHED"

        metrics_tab = page.replace(f"/runs/{tracker.run_id}?", f"/runs/{tracker.run_id}/model-metrics?")
        wanted = [f"ui ({key})" for key in ("loss/dmd", "loss/fake")]  # the charts' legends: run name (metric)
        # The charts' data arrive over real sockets while Chromium's virtual time runs on; on a loaded
        # machine one render can end before them, so the page is read again (at most 5 times) until
        # the charts are in it.
        shot = tmp_path / "run_page.png"
        for _ in range(5):
            dom = chromium(metrics_tab, shot)
            if all(w in dom for w in wanted):
                break
        assert ">Model training<" in dom  # the training view, not GenAI's traces
        for key in ("loss/dmd", "loss/fake"):
            assert f"ui ({key})" in dom, key  # the chart's legend: run name (metric)
        assert "No image logged at this step" not in dom
        assert "get-artifact?path=images%2Fgenerator%2Bstep%2B0" in dom  # the grid, in the image card at step 0
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    finally:
        server.stop()
