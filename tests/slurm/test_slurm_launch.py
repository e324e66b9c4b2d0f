"""Launching on the real Slurm cluster: submitit with 2 tasks on 2 emulated nodes, a real preemption
signal -> every rank saves -> requeue -> resume from the newest valid checkpoint with the same run
id; a real error is not requeued; requests the cluster cannot serve fail before submission."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashdmd.config import load_config
from jobs import cluster, launcher
from jobs.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def probe_submit(tmp_path: Path, name: str, iterations: int, tags: str, every: int = 5):
    cfg = load_config("gmm2d", [
        "launch.executor=slurm", "launch.gpus_per_node=1", "launch.nodes=2", "launch.cpus_per_task=1",
        "launch.time_minutes=30", "launch.signal_lead_s=60", "launch.max_requeues=2",
        f"stage1.iterations={iterations}", f"checkpoint.every={every}", f"tracking.tags={tags}",
        f"run_root={tmp_path}", f"name={name}", "engine.collective_timeout_s=120",
    ])
    plan = build_plan("stage1", "gmm2d", cfg)
    return launcher.submit(plan, cfg, entry="probe_job:main", pythonpath=[str(HERE)])


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def test_preemption_saves_on_all_ranks_requeues_and_resumes(slurm_cluster, tmp_path):
    sub = probe_submit(tmp_path, "preempt", iterations=30, tags="{step_s: '0.3'}")
    run_dir = sub.cfg.run_dir
    wait_for(lambda: any(e["event"] == "step" and e["step"] >= 6 for e in events(run_dir)), 120, "step 6", )
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", sub.job_id], check=True)  # what Slurm sends before the limit
    results = launcher.wait(sub, timeout_s=240)
    log = events(run_dir)

    # both ranks ran on the two emulated nodes, in one run, after exactly one requeue
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world"] for r in results} == {2} and {r["restarts"] for r in results} == {1}
    assert {r["launcher"] for r in results} == {"slurm"} and {r["master"] for r in results} == {"127.0.0.1"}
    wait_for(lambda: cluster.job_state(sub.job_id) not in cluster.ACTIVE_STATES, 60, "the job to end")
    assert cluster.job_field(sub.job_id, "Restarts") == "1"
    assert cluster.job_state(sub.job_id) == "COMPLETED"

    start, stop, resume = (next(e for e in log if e["event"] == k) for k in ("start", "stop", "resume"))
    assert resume["run_id"] == start["run_id"] == results[0]["run_id"] == results[1]["run_id"]
    assert stop["signal"] == "SIGUSR1" and resume["step"] == stop["step"] and resume["restart"] == 1
    # the stop checkpoint was written by every rank and marked valid last
    saved = sub.cfg.checkpoint_dir / f"step_{stop['step']:08d}"
    assert sorted(p.name for p in saved.iterdir()) == ["COMPLETE", "rank0.json", "rank1.json"]
    # the run did every planned step exactly once: nothing repeated, nothing skipped
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(30))
    assert log[-1]["event"] == "done"
    first_step_after = next(e for e in log if e["event"] == "step" and e["restart"] == 1)
    timing = {"signal_to_stop_s": stop["time"] - signalled, "signal_to_resumed_s": resume["time"] - signalled,
              "signal_to_first_step_s": first_step_after["time"] - signalled}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    print("preemption timing:", json.dumps({k: round(v, 1) for k, v in timing.items()}))
    assert timing["signal_to_stop_s"] < 10


def test_real_error_fails_the_job_without_requeue(slurm_cluster, tmp_path):
    sub = probe_submit(tmp_path, "fails", iterations=20, tags="{step_s: '0.05', fail_at: '3'}")
    with pytest.raises(Exception, match="deliberate failure at step 3"):
        launcher.wait(sub, timeout_s=120)
    wait_for(lambda: cluster.job_state(sub.job_id) not in cluster.ACTIVE_STATES, 60, "the job to end")
    assert cluster.job_field(sub.job_id, "Restarts") == "0"
    assert cluster.job_state(sub.job_id) == "FAILED"


def submit_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_requests_the_cluster_cannot_serve_fail_before_submission(slurm_cluster, tmp_path):
    out = submit_cli("stage1", "--config", "gmm2d", "--executor", "slurm", "--partition", "gpu-a100", f"run_root={tmp_path}")
    assert out.returncode == 2 and "partition 'gpu-a100' does not exist" in out.stderr and "debug (default)" in out.stderr
    out = submit_cli("stage1", "--config", "gmm2d", "--executor", "slurm", "--nodes", "3", f"run_root={tmp_path}")
    assert out.returncode == 2 and "--nodes 3 is more than partition 'debug' offers (2 nodes)" in out.stderr
    assert not (tmp_path / "gmm2d-stage1" / "submitit").exists()  # nothing was submitted
