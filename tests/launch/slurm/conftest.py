"""The real Slurm cluster for tests marked ``slurm``: started once per session by scripts/slurm_up.sh.

The tests skip only when Slurm cannot run on this machine at all (the script exits 77: not
installed and not installable, or not root); any other start-up failure is an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
CANNOT_RUN = 77


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the environment (with SLURM_CONF) of a running 2-node cluster; stops it afterwards if it started it."""
    was_up = _has("sinfo") and subprocess.run(["timeout", "5", "sinfo", "-h"], capture_output=True).returncode == 0
    out = subprocess.run([str(ROOT / "scripts" / "slurm_up.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode == CANNOT_RUN:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, f"scripts/slurm_up.sh failed:\n{out.stderr}"
    conf = out.stdout.strip().split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    sys.path.insert(0, str(HERE))  # probe_job, for the launcher's entry
    yield dict(os.environ)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_up:
        subprocess.run([str(ROOT / "scripts" / "slurm_down.sh")], capture_output=True, timeout=120)


def _has(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None
