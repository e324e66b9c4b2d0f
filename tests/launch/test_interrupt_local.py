"""Ctrl-C and TERM on a local run started the way users start it (``python jobs/submit.py stage1``).

Ctrl-C is what a terminal does: SIGINT to the whole foreground process group (submit.py, submitit's
local controller and the training task). TERM is sent to submit.py alone. Either way the run saves
at the next step boundary, the MLflow run is KILLED, nothing prints a traceback, and a rerun of the
command resumes from the saved step and finishes the same MLflow run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from flashdmd.train.checkpoint import latest_valid

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]


def start(tmp_path: Path, cache: Path, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "jobs" / "submit.py"), "stage1", "--config", "gmm2d", "--executor", "local",
            "--name", "ctrl", f"run_root={tmp_path}", f"model.cache_dir={cache}", "model.gmm.teacher_steps=50",
            "data.batch_size=32", "tracking.log_every=1", "checkpoint.every=100000", *extra]
    with open(log, "wb") as out:  # a session of its own: the test plays the terminal of its process group
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def wait_for_progress(proc: subprocess.Popen, log: Path, step: int) -> None:
    """Until the followed job log shows the progress line of ``step`` (fails if the command ends first)."""
    while f"step {step}/" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)


def run_status(tmp_path: Path) -> tuple[str, str]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("flashdmd").experiment_id, "attributes.run_name = 'ctrl'")
    return run.info.run_id, run.info.status


def saved_step(tmp_path: Path) -> int:
    path = latest_valid(tmp_path / "ctrl" / "checkpoints")
    assert path is not None
    return json.loads((path / "trainer.json").read_text())["step"]


def test_ctrl_c_and_term_save_mark_killed_and_resume(tmp_path: Path):
    cache = tmp_path / "cache"
    # 1. Ctrl-C: SIGINT to the whole process group
    log1 = tmp_path / "first.log"
    proc = start(tmp_path, cache, log1)
    wait_for_progress(proc, log1, 2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait()
    out = log1.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    assert "rerun the same command to resume" in out and "writer process is gone" not in out, out[-4000:]
    first = saved_step(tmp_path)
    run_id, status = run_status(tmp_path)
    assert first >= 2 and status == "KILLED"

    # 2. TERM to submit.py only: it forwards it to the job, which saves and stops the same way
    log2 = tmp_path / "second.log"
    proc = start(tmp_path, cache, log2)
    wait_for_progress(proc, log2, first + 2)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    out = log2.read_text()
    assert f"resuming run ctrl from step {first}" in out, out[-4000:]
    assert "Traceback" not in out and "rerun the same command to resume" in out, out[-4000:]
    second = saved_step(tmp_path)
    assert second >= first + 2 and run_status(tmp_path) == (run_id, "KILLED")

    # 3. the rerun, told to stop two steps later (another config: --resume), finishes the same run
    log3 = tmp_path / "third.log"
    proc = start(tmp_path, cache, log3, "--resume", f"stage1.iterations={second + 2}")
    assert proc.wait() == 0, log3.read_text()[-4000:]
    out = log3.read_text()
    assert f"resuming run ctrl from step {second}" in out and "stage1.iterations" in out, out[-4000:]
    assert len(re.findall(r"stage1 finished", out)) == 2  # the trainer's line and submit.py's, once each
    assert run_status(tmp_path) == (run_id, "FINISHED")
