"""The launcher on the real Slurm cluster with the test-only probe entry (tests/launch/slurm/probe_job.py):
a real error fails the job without a requeue; requests the cluster cannot serve fail before
submission. The preemption -> save -> requeue -> resume path runs through flashdmd.train.main in
test_slurm_train.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from flashdmd.config import load_config
from jobs import cluster, launcher
from jobs.plan import build_plan

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def probe_submit(tmp_path: Path, name: str, iterations: int, tags: str, every: int = 5, dependency: str = ""):
    cfg = load_config("gmm2d", [
        "launch.executor=slurm", "launch.gpus_per_node=1", "launch.nodes=2", "launch.cpus_per_task=1",
        "launch.time_minutes=30", "launch.signal_lead_s=60", "launch.max_requeues=2",
        f"stage1.iterations={iterations}", f"checkpoint.every={every}", f"tracking.tags={tags}",
        f"run_root={tmp_path}", f"name={name}", "engine.collective_timeout_s=120",
    ])
    plan = build_plan("stage1", "gmm2d", cfg)
    return launcher.submit(plan, cfg, dependency=dependency, entry="probe_job:main", pythonpath=[str(HERE)])


def test_real_error_fails_the_job_without_requeue_and_cancels_its_dependent(slurm_cluster, tmp_path):
    sub = probe_submit(tmp_path, "fails", iterations=20, tags="{step_s: '0.05', fail_at: '3'}")
    after = probe_submit(tmp_path, "after", iterations=2, tags="{}", dependency=f"afterok:{sub.job_id}")
    with pytest.raises(Exception, match="deliberate failure at step 3"):
        launcher.wait(sub, timeout_s=120, poll_s=0.25)
    wait_for(lambda: cluster.job_state(sub.job_id) not in cluster.ACTIVE_STATES, 60, "the job to end")
    assert cluster.job_field(sub.job_id, "Restarts") == "0"
    assert cluster.job_state(sub.job_id) == "FAILED"
    # the dependent stage is cancelled (kill-on-invalid-dep), not left pending forever
    wait_for(lambda: cluster.job_state(after.job_id) not in cluster.ACTIVE_STATES, 60, "the dependent job to end")
    assert cluster.job_state(after.job_id) == "CANCELLED"
    assert not (tmp_path / "after" / "events.jsonl").exists()


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scontrol_requeue_saves_on_sigterm_and_slurm_resumes_the_run(slurm_cluster, tmp_path):
    """An admin requeue (like PreemptMode=REQUEUE) sends TERM: all ranks save, exit, Slurm requeues."""
    sub = probe_submit(tmp_path, "requeued", iterations=12, tags="{step_s: '0.3'}", every=100)
    run_dir = sub.cfg.run_dir
    wait_for(lambda: any(e["event"] == "step" and e["step"] >= 3 for e in events(run_dir)), 120, "step 3")
    subprocess.run(["scontrol", "requeue", sub.job_id], check=True)
    # the first run left no result: these come from the resumed run
    results = launcher.wait(sub, timeout_s=240, poll_s=0.25)
    log = events(run_dir)
    stop, resume = (next(e for e in log if e["event"] == k) for k in ("stop", "resume"))
    assert stop["signal"] == "SIGTERM" and resume["step"] == stop["step"] and resume["restart"] == 1
    assert {r["run_id"] for r in results} == {log[0]["run_id"]} and {r["restarts"] for r in results} == {1}
    # two ranks on the two emulated nodes; rank 0's node n1 reached through its NodeAddr, not its name
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world"] for r in results} == {2}
    assert {r["launcher"] for r in results} == {"slurm"} and {r["master"] for r in results} == {"127.0.0.1"}
    saved = sub.cfg.checkpoint_dir / f"step_{stop['step']:08d}"
    assert sorted(p.name for p in saved.iterdir()) == ["COMPLETE", "rank0.json", "rank1.json"]
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(12))  # every step exactly once


def submit_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_requests_the_cluster_cannot_serve_fail_before_submission(slurm_cluster, tmp_path):
    base = ("stage1", "--config", "gmm2d", "--executor", "slurm", f"run_root={tmp_path}")
    out = submit_cli(*base, "--partition", "gpu-a100")
    assert out.returncode == 2 and "partition 'gpu-a100' does not exist" in out.stderr
    assert "partitions: debug (default)" in out.stderr
    out = submit_cli(*base, "--nodes", "3")
    assert out.returncode == 2 and "--nodes 3 is more than partition 'debug' offers (2 nodes)" in out.stderr
    assert not (tmp_path / "gmm2d-stage1" / "submitit").exists()  # nothing was submitted
