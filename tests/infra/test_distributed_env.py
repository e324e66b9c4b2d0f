"""flashdmd.infra.distributed and flashdmd.train.preemption without Slurm: env parsing, device choice, ports,
and the signal -> agreement path over a real 2-process gloo group."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flashdmd.infra.distributed import (
    LaunchEnvError,
    choose_device,
    export_env,
    parse_launch_env,
    port_for_job,
    tasks_on_node,
)

ROOT = Path(__file__).resolve().parents[2]


def no_resolve(nodelist: str) -> str:
    raise AssertionError(f"resolver must not be called, got {nodelist}")


def test_single_process_when_no_launcher():
    le = parse_launch_env({"HOME": "/root", "SLURM_JOB_ID": "7"}, no_resolve)  # batch shell: no step
    assert (le.launcher, le.rank, le.world_size, le.local_rank) == ("single", 0, 1, 0)


def test_torchrun_variables_are_taken_as_they_are():
    env = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29400"}
    le = parse_launch_env(env, no_resolve)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("torchrun", 5, 8, 1, 4)
    assert (le.node_rank, le.num_nodes, le.master_addr, le.master_port) == (1, 2, "10.0.0.9", 29400)


def test_srun_two_nodes_resolves_first_node_of_the_step():
    asked = []

    def resolve(nodelist: str) -> str:
        asked.append(nodelist)
        return "192.168.1.7"

    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_RESTART_COUNT": "2",
           "MASTER_ADDR": "stale-from-login-shell"}
    le = parse_launch_env(env, resolve)
    assert asked == ["gpu[07-08]"]
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert (le.node_rank, le.num_nodes, le.master_addr, le.restart_count) == (1, 2, "192.168.1.7", 2)
    assert le.master_port == port_for_job("4242", 2)


def test_submitit_local_variables():
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}
    le = parse_launch_env(env, no_resolve)
    assert (le.launcher, le.rank, le.world_size, le.master_addr) == ("submitit-local", 1, 2, "127.0.0.1")
    assert le.master_port == port_for_job("31337")


def test_ports_same_for_all_ranks_in_range_and_fresh_after_requeue():
    ports = {port_for_job(str(j), r) for j in range(1, 300) for r in range(3)}
    assert all(20000 <= p < 60000 for p in ports)
    assert port_for_job("123", 0) == port_for_job("123", 0) != port_for_job("123", 1)
    assert port_for_job("55_3") == port_for_job("553")  # array ids: digits only


def test_tasks_per_node_expansion():
    assert tasks_on_node("2(x3),1", 0) == 2 and tasks_on_node("2(x3),1", 2) == 2 and tasks_on_node("2(x3),1", 3) == 1
    with pytest.raises(LaunchEnvError, match="lists no node 4"):
        tasks_on_node("2(x3),1", 4)
    with pytest.raises(LaunchEnvError, match="cannot parse"):
        tasks_on_node("two", 0)


def test_bad_values_name_the_variable():
    with pytest.raises(LaunchEnvError, match="SLURM_NTASKS='x'"):
        env = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "x"}
        parse_launch_env(env, no_resolve)
    with pytest.raises(LaunchEnvError, match="rank 4 is outside world size 2"):
        parse_launch_env({"RANK": "4", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, no_resolve)


def test_device_choice_with_and_without_per_task_visibility():
    assert choose_device(1, 2, cuda_count=0) == torch.device("cpu")
    assert choose_device(3, 4, cuda_count=1) == torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES set per task
    assert choose_device(3, 4, cuda_count=4) == torch.device("cuda", 3)  # tasks share the node's GPUs
    with pytest.raises(LaunchEnvError, match="4 tasks on this node but 2 visible GPUs"):
        choose_device(3, 4, cuda_count=2)


def test_export_env_writes_torch_variables():
    le = parse_launch_env({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "9", "SUBMITIT_LOCAL_NTASKS": "2",
                           "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}, no_resolve)
    env: dict[str, str] = {}
    export_env(le, env)
    assert env == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port_for_job("9"))}


WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from flashdmd.config import load_config
    from flashdmd.infra.distributed import init_distributed, shutdown
    from flashdmd.train.preemption import Preemption, PreemptedError
    cfg = load_config("gmm2d", ["engine.collective_timeout_s=60"])
    ctx = init_distributed(cfg)
    guard = Preemption(cfg, ctx)
    stopped = None
    for step in range(200):
        if step == 3 and ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)   # only rank 1 is signalled
        if guard.should_stop(step):
            stopped = step
            break
        time.sleep(0.01)
    print(f"rank={ctx.rank} world={ctx.world_size} backend={ctx.backend} stopped={stopped}", flush=True)
    try:
        guard.stop(stopped)
    except PreemptedError as err:
        print(f"rank={ctx.rank} error={err}", flush=True)
    shutdown()
""")


@pytest.mark.distributed
def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    """Two real processes over gloo, launched the torchrun way; a plain launcher cannot requeue."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    port = str(port_for_job(str(os.getpid())))
    base.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")  # gloo on CPU even on a GPU machine
    procs = [subprocess.Popen([sys.executable, str(script)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, out in enumerate(outs):
        assert f"rank={r} world=2 backend=gloo stopped=3" in out, out
        assert "cannot requeue" in out, out
