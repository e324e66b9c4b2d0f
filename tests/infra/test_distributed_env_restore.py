"""A run inside a long-lived process leaves no launch variables behind for the jobs it submits later."""
from __future__ import annotations

import os

from flashdmd.config import load_config
from flashdmd.infra.distributed import init_distributed, parse_launch_env, shutdown


def test_shutdown_restores_the_launch_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "31337")
    ctx = init_distributed(load_config("gmm2d"))
    assert ctx.launcher == "single" and os.environ["RANK"] == "0"
    shutdown()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["MASTER_PORT"] == "31337"  # a value that was there before comes back
    slurm_task = {**os.environ, "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2",
                  "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    assert parse_launch_env(slurm_task, lambda nodes: "127.0.0.1").launcher == "slurm"
