"""jobs/submit.py as a user runs it: dry-run plans and clear config errors, in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def submit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), *args], capture_output=True, text=True, cwd=cwd)


def shards(tmp_path) -> str:
    """An (empty) local shard, so the preflight of a dry run finds the training data."""
    (tmp_path / "train-000000.tar").write_bytes(b"")
    return f"data.shards={tmp_path}/train-000000.tar"


def test_dry_run_plan_shows_nodes_and_world_size(tmp_path):
    out = submit("stage1", "--config", "sdxl-4step", "--nodes", "4", "--dry-run", "--executor", "slurm", f"run_root={tmp_path}",
                 shards(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "nodes:          4" in out.stdout
    assert "world size:     32 (4 x 8)" in out.stdout
    assert "tasks_per_node: 8" in out.stdout
    assert f"{tmp_path}/sdxl-4step-stage1" in out.stdout
    assert "launch.nodes: 1 -> 4" in out.stdout


def test_typo_names_key_and_suggestion():
    out = submit("stage1", "--dry-run", "stage1.tturr=2")
    assert out.returncode == 2
    assert "stage1.tturr" in out.stderr and "did you mean 'stage1.ttur'" in out.stderr
    assert "Traceback" not in out.stderr


def test_rule_violation_names_rule():
    out = submit("stage1", "--dry-run", "stage1.ttur=0")
    assert out.returncode == 2 and "stage1.ttur must be >= 1" in out.stderr


def test_yaml_with_wrong_type_names_file_and_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("base: tiny-sdxl\ndata:\n  batch_size: many\n")
    out = submit("stage1", "--config", str(bad), "--dry-run")
    assert out.returncode == 2
    assert "mine.yaml" in out.stderr and "data.batch_size" in out.stderr


def test_full_config_dump_loads_back(tmp_path):
    from flashdmd.config import from_yaml, load_config

    out = submit("stage1", "--config", "sd3-medium-4step", "--dry-run", "--full-config", shards(tmp_path))
    assert out.returncode == 0, out.stderr
    dumped = out.stdout.split("resolved config:\n", 1)[1]
    cfg = from_yaml("\n".join(line[2:] for line in dumped.splitlines()))
    expected = load_config("sd3-medium-4step", [shards(tmp_path)])
    expected.name = "sd3-medium-4step-stage1"
    assert cfg == expected


def test_slurm_executor_without_sbatch_fails_before_submission(tmp_path):
    import os

    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no sbatch, no scontrol
    # the cluster is asked before the preflight imports torch (a checked behaviour, not a timing)
    argv = ["jobs/submit.py", "stage1", "--config", "gmm2d", "--executor", "slurm", f"run_root={tmp_path}"]
    probe = ("import runpy, sys\n"
             f"sys.argv = {argv!r}\n"
             "try:\n    runpy.run_path('jobs/submit.py', run_name='__main__')\n"
             "except SystemExit as end:\n    print('EXIT', end.code)\n"
             "print('TORCH LOADED' if 'torch' in sys.modules else 'TORCH NOT LOADED')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["EXIT", "2", "TORCH", "NOT", "LOADED"], out.stdout + out.stderr
    assert "--executor slurm needs sbatch on PATH" in out.stderr and "Traceback" not in out.stderr


def test_pipeline_dry_run_chains_stage2_on_stage1(tmp_path):
    out = submit("pipeline", "--config", "gmm2d", "--name", "exp", "--dry-run", "--executor", "slurm",
                 f"run_root={tmp_path}")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n\n")
    assert "job:            stage1" in first and f"run directory:  {tmp_path}/exp-stage1" in first
    assert "job:            stage2" in second and f"run directory:  {tmp_path}/exp-stage2" in second
    assert f"stage2.init_from: '' -> '{tmp_path}/exp-stage1'" in second
    assert "dependency:     afterok on the stage-1 job" in second


def test_help_lists_jobs_presets_and_examples_without_importing_torch():
    # parse first, import later: --help must not pay for torch (a checked behaviour, not a timing)
    probe = ("import runpy, sys\n"
             "sys.argv = ['jobs/submit.py', '--help']\n"
             "try:\n    runpy.run_path('jobs/submit.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('TORCH LOADED' if 'torch' in sys.modules else 'TORCH NOT LOADED')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("TORCH NOT LOADED")
    from jobs.plan import JOBS

    jobs = out.stdout.split("\njobs:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in jobs] == list(JOBS)
    assert all(len(line.split()) > 3 for line in jobs)  # each job says what it does
    presets = sorted(p.stem for p in (ROOT / "jobs" / "configs").glob("*.yaml"))
    listed = out.stdout.split("\npresets", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split()[0] for line in listed] == presets
    assert "tiny-sdxl (default)" in out.stdout and "(default: tiny-sdxl)" in " ".join(out.stdout.split())
    assert out.stdout.count("  python jobs/submit.py ") == 2
    assert "``" not in out.stdout


def test_help_examples_parse():
    from jobs.submit import EXAMPLES, parse_args

    for line in EXAMPLES.splitlines():
        if line.strip().startswith("python jobs/submit.py"):
            args = parse_args(line.split()[2:])
            assert args.job == "stage1"
