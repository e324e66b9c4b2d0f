"""jobs/launcher.py on submitit's local executor (no Slurm): 2 real processes over gloo, a preemption
signal to one rank -> both save -> the local controller restarts the tasks -> resume, same run id."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from flashdmd.config import load_config
from jobs import launcher
from jobs.plan import build_plan

PROBE_DIR = Path(__file__).resolve().parent / "slurm"


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.distributed
def test_local_executor_two_processes_preempt_and_resume(tmp_path):
    cfg = load_config("gmm2d", ["launch.executor=local", "launch.gpus_per_node=2", "stage1.iterations=16",
                                "checkpoint.every=100", "tracking.tags={step_s: '0.2'}", f"run_root={tmp_path}",
                                "name=local"])
    sub = launcher.submit(build_plan("stage1", "gmm2d", cfg), cfg, entry="probe_job:main", pythonpath=[str(PROBE_DIR)])
    run_dir = sub.cfg.run_dir
    while not any(e["event"] == "step" and e["step"] >= 3 for e in events(run_dir)):
        assert not sub.job.done(), f"the job ended before step 3; see {sub.stdout}"  # no clock: a loaded machine is slow
        time.sleep(0.1)
    os.kill(events(run_dir)[0]["pid"], signal.SIGUSR1)  # rank 0 only; rank 1 learns it in the all-reduce
    results = launcher.wait(sub, poll_s=0.25)
    log = events(run_dir)
    kinds = [e["event"] for e in log if e["event"] != "step"]
    assert kinds == ["start", "stop", "resume", "done"], kinds
    assert {r["run_id"] for r in results} == {log[0]["run_id"]} and sorted(r["rank"] for r in results) == [0, 1]
    assert {r["launcher"] for r in results} == {"submitit-local"}
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(16))
    assert (sub.folder / f"{sub.job_id}_requeues").read_text() == "1"
