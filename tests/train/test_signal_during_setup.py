"""A stop signal during the set-up (here the toy teacher's pretraining) is recorded, not fatal.

The run is started the way users start it (``python jobs/submit.py stage1``) and gets TERM while
it pretrains the gmm2d teacher, before its first step. It must finish the pretraining (the teacher
lands in the cache, so a rerun does not train it again), save after its first step, exit with
TERM's status and no traceback, and a rerun of the command resumes from that step. Before, the
handlers went in after the set-up and TERM killed the process with nothing saved.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashdmd.train.checkpoint import latest_valid

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]


def start(tmp_path: Path, log: Path) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "jobs" / "submit.py"), "stage1", "--config", "gmm2d", "--executor", "local",
            "--name", "setup", f"run_root={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}",
            "model.gmm.teacher_steps=2000", "model.gmm.hidden=64", "data.batch_size=16", "stage1.iterations=3",
            "tracking.log_every=1", "tracking.sample_every=0", "checkpoint.every=100000"]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def test_term_during_teacher_pretraining_saves_after_the_first_step_and_resumes(tmp_path: Path):
    log = tmp_path / "first.log"
    proc = start(tmp_path, log)
    while "pretraining the gmm2d teacher" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # submit.py forwards it to the training task
    proc.wait(timeout=600)
    out = log.read_text()
    assert "Traceback" not in out and "rerun the same command to resume" in out, out[-4000:]
    saved = latest_valid(tmp_path / "setup" / "checkpoints")
    assert saved is not None and json.loads((saved / "trainer.json").read_text())["step"] == 1, out[-4000:]
    assert len(list((tmp_path / "cache").glob("gmm2d-teacher-*.safetensors"))) == 1

    again = tmp_path / "second.log"
    rerun = start(tmp_path, again)
    assert rerun.wait(timeout=600) == 0, again.read_text()[-4000:]
    out = again.read_text()
    assert "resuming run setup from step 1" in out and "pretraining the gmm2d teacher" not in out, out[-4000:]
