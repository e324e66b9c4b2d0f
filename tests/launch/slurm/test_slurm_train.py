"""flashdmd.train.main on the real Slurm cluster, the way users launch it: ``jobs/submit.py`` (submitit,
2 tasks on 2 emulated nodes) with a preemption signal mid-run, ``sbatch slurm/stage1.sbatch``,
and ``jobs/submit.py pipeline`` (stage 2 held by an afterok dependency on stage 1).

The gmm2d preset with a briefly trained teacher keeps each job to seconds of training; the
teacher is built once per session into a shared cache (model.cache_dir)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_store import migrated_store
from waiting import wait_for

from flashdmd.train.checkpoint import step_dirs
from jobs import cluster

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

SMALL = ["model.gmm.teacher_steps=50", "data.batch_size=32", "tracking.log_every=1", "launch.cpus_per_task=1",
         "launch.time_minutes=20", "launch.signal_lead_s=60", "engine.collective_timeout_s=120"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("teacher-cache"))


@pytest.fixture(autouse=True)
def store(tmp_path) -> None:
    """Each test's run root (tmp_path) starts with an empty migrated MLflow store, as an existing root has."""
    migrated_store(tmp_path)


def submit(*args: str) -> tuple[list[str], str]:
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return re.findall(r"as slurm job (\d+)", out.stdout), out.stdout


def ended(job_id: str) -> bool:
    return cluster.job_state(job_id) not in cluster.ACTIVE_STATES


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def log_tail(run_dir: Path, job_id: str) -> str:
    logs = sorted((run_dir / "submitit").glob(f"{job_id}_*_log.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


def test_submit_stage1_two_tasks_preempted_requeued_resumed(slurm_cluster, tmp_path, cache):
    iterations = 16
    (job_id,), printed = submit("stage1", "--config", "gmm2d", "--executor", "slurm", "--nodes", "2",
                                "--gpus-per-node", "1", "--name", "pre", f"run_root={tmp_path}",
                                f"model.cache_dir={cache}", f"stage1.iterations={iterations}", "checkpoint.every=100",
                                *SMALL)
    run_dir = tmp_path / "pre"
    assert f"run directory: {run_dir}" in printed and "mlflow:" in printed and f"{job_id}_0_log.out" in printed

    wait_for(lambda: len(metric_rows(run_dir)) >= 3 or ended(job_id), 300, "training to start")
    assert not ended(job_id), log_tail(run_dir, job_id)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what Slurm sends ahead of the time limit
    wait_for(lambda: ended(job_id), 400, "the requeued job to finish")

    assert cluster.job_state(job_id) == "COMPLETED", log_tail(run_dir, job_id)
    assert cluster.job_field(job_id, "Restarts") == "1"
    steps = [step for step, _ in step_dirs(run_dir / "checkpoints")]
    stop_step = steps[0]  # the preemption checkpoint (checkpoint.every is beyond the run)
    assert 0 < stop_step < iterations and steps == [stop_step, iterations]
    assert (run_dir / "final" / "generator.safetensors").is_file()  # the hand-over of full weights

    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, iterations + 1))  # each step once, none lost
    resumed = next(r for r in rows if r["step"] == stop_step + 1)
    timing = {"signal_to_first_resumed_step_s": round(resumed["time"] / 1000 - signalled, 1)}
    print("preemption -> resumed training:", json.dumps(timing))
    (tmp_path / "timing.json").write_text(json.dumps(timing))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("flashdmd").experiment_id, "attributes.run_name = 'pre'")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "perf/step_s")  # logged on every step
    assert sorted(m.step for m in history) == list(range(1, iterations + 1))  # the same run, no duplicated steps
    assert json.loads((run_dir / "final" / "handoff.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_sbatch_script_runs_two_ranks_without_the_launcher(slurm_cluster, tmp_path, cache):
    # polled, not `sbatch --wait`, which looks at the job ever less often (after 2, 10, then 42 s here)
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=15", f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err",
         "slurm/stage1.sbatch", "--config", "gmm2d", f"run_root={tmp_path}", "name=sb", f"model.cache_dir={cache}",
         "stage1.iterations=6", "checkpoint.every=3", *SMALL],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_for(lambda: ended(job_id), 400, "the job to finish")
    logs = "".join(p.read_text() for pattern in ("*.out", "*.err") for p in tmp_path.glob(pattern))
    assert cluster.job_state(job_id) == "COMPLETED", logs[-4000:]
    assert "2 tasks" in logs and logs.count("stage1 finished") == 1  # one line per job, not per rank
    assert [r["step"] for r in metric_rows(tmp_path / "sb")] == list(range(1, 7))
    assert (tmp_path / "sb" / "final" / "generator.safetensors").is_file()


def test_sbatch_script_requeues_on_usr1_to_the_batch_shell(slurm_cluster, tmp_path, cache):
    """`scancel --signal=USR1 --batch` (or a site's --signal=B:USR1@N) reaches only the batch shell; its trap
    forwards it to the job step, which saves, requeues and resumes like `scancel --signal=USR1`."""
    iterations = 16  # as in the submitit test: the trap forwards the signal at once, the stop comes a step later
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=15", f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err",
         "slurm/stage1.sbatch", "--config", "gmm2d", f"run_root={tmp_path}", "name=bt", f"model.cache_dir={cache}",
         f"stage1.iterations={iterations}", "checkpoint.every=1000", *SMALL],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    run_dir = tmp_path / "bt"
    logs = lambda: "".join(p.read_text() for pattern in ("*.out", "*.err") for p in tmp_path.glob(pattern))  # noqa: E731
    wait_for(lambda: len(metric_rows(run_dir)) >= 3 or ended(job_id), 300, "training to start")
    assert not ended(job_id), logs()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    wait_for(lambda: ended(job_id), 400, "the requeued job to finish")
    text = logs()
    assert cluster.job_state(job_id) == "COMPLETED", text[-4000:]
    assert cluster.job_field(job_id, "Restarts") == "1", text[-4000:]
    assert "forwarding it to the job step" in text and "resuming run bt from step" in text
    assert "writer process is gone" not in text and "Traceback" not in text, text[-4000:]
    assert text.count("stage1 finished") == 1  # one line per job, from rank 0
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, iterations + 1))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("flashdmd").experiment_id, "attributes.run_name = 'bt'")
    assert run.info.status == "FINISHED" and run.data.tags["nodes"] == "2"


def test_pipeline_runs_stage2_after_stage1_through_the_dependency(slurm_cluster, tmp_path, cache):
    (first, second), printed = submit("pipeline", "--config", "gmm2d", "--executor", "slurm", "--name", "pipe",
                                      f"run_root={tmp_path}", f"model.cache_dir={cache}", "stage1.iterations=6",
                                      "stage2.iterations=4", "checkpoint.every=100", *SMALL)
    assert f"runs after:    afterok:{first}" in printed
    assert cluster.job_field(second, "Dependency").startswith(f"afterok:{first}")
    wait_for(lambda: ended(first) and ended(second), 400, "both stages")
    assert cluster.job_state(first) == "COMPLETED", log_tail(tmp_path / "pipe-stage1", first)
    assert cluster.job_state(second) == "COMPLETED", log_tail(tmp_path / "pipe-stage2", second)
    assert cluster.job_field(second, "StartTime") >= cluster.job_field(first, "EndTime")
    assert (tmp_path / "pipe-stage2" / "final" / "generator.safetensors").is_file()
    config2 = (tmp_path / "pipe-stage2" / "config.yaml").read_text()
    assert f"init_from: {tmp_path / 'pipe-stage1'}" in config2
