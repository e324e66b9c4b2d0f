"""Distributed setup from the launcher's environment (DESIGN.md "run" layer).

One process per GPU (or per CPU worker). Which launcher started us is read from the environment,
in this order:

1. torchrun (``TORCHELASTIC_RUN_ID`` or a full RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set):
   its variables are used as they are.
2. submitit's local executor (``SUBMITIT_EXECUTOR=local``): the ``SUBMITIT_LOCAL_*`` variables
   that submitit's JobEnvironment reads; everything runs on this host.
3. srun, directly from an sbatch script or through submitit's Slurm executor (``SLURM_PROCID``
   inside a job step): ``SLURM_*`` variables. Rank 0 runs on the first node of the step, so
   MASTER_ADDR is that node's address, found with ``scontrol show hostnames`` and the node's
   ``NodeAddr`` rather than by assuming node names resolve as hosts (they do not on clusters
   with emulated or aliased nodes). MASTER_PORT is derived from the job id and the restart
   count, so every rank computes the same port and a requeued job never races the previous
   run's listening socket (submitit #1613).
4. otherwise a single process.

The parsed values are exported back as RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, so DeepSpeed and torch's env:// init see the same numbers.
Device: with CUDA, ``cuda:0`` when each task sees one GPU (CUDA_VISIBLE_DEVICES set per task,
e.g. by ``--gpus-per-task`` or submitit's helper), ``cuda:LOCAL_RANK`` when tasks share a node's
GPUs; NCCL on GPU, gloo on CPU. Collective timeout: ``cfg.engine.collective_timeout_s``.
Departs from submitit's TorchDistributedEnvironment: never rewrites CUDA_VISIBLE_DEVICES.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from flashdmd.config import Config

PORT_BASE = 20000
PORT_SPAN = 40000

Resolver = Callable[[str], str]


class LaunchEnvError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable to fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, before any process group exists."""

    launcher: str  # torchrun | slurm | submitit-local | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str = ""
    restart_count: int = 0


@dataclass(frozen=True)
class DistContext(LaunchEnv):
    """The initialised process: what the launcher said, plus where it computes and over what backend."""

    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------------------------
# Parsing the environment (pure apart from the node-address resolver)
# --------------------------------------------------------------------------------------------


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchEnvError(f"environment variable {name} is missing")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def port_for_job(job_id: str, restart_count: int = 0) -> int:
    """A port in [20000, 60000) every rank derives alike from the job id; a requeue gets a new one."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + (int(digits) * 7 + restart_count) % PORT_SPAN


def tasks_on_node(tasks_per_node: str, node_rank: int) -> int:
    """Expand Slurm's compressed SLURM_TASKS_PER_NODE ("2(x3),1") and pick this node's count."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchEnvError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node_rank >= len(counts):
        raise LaunchEnvError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} lists no node {node_rank}")
    return counts[node_rank]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's hostlist expression -> node names, via ``scontrol show hostnames``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except FileNotFoundError:
        # no scontrol on this node (some container setups): submitit's own parser does the same expansion
        from submitit.slurm.slurm import _parse_node_list

        return list(_parse_node_list(nodelist))
    except subprocess.CalledProcessError as err:
        raise LaunchEnvError(f"scontrol show hostnames {nodelist!r} failed: {err.stderr.strip()}") from None
    names = out.split()
    if not names:
        raise LaunchEnvError(f"SLURM nodelist {nodelist!r} expands to no node")
    return names


def slurm_node_address(node: str) -> str:
    """The address other nodes reach ``node`` at: Slurm's NodeAddr, else the name itself if it resolves."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", node, "--oneliner"], capture_output=True, text=True, timeout=30
        ).stdout
    except FileNotFoundError:
        out = ""
    match = re.search(r"\bNodeAddr=(\S+)", out)
    addr = match.group(1) if match else node
    try:
        socket.getaddrinfo(addr, None)
    except socket.gaierror:
        raise LaunchEnvError(
            f"the first node of the job, {node!r}, has address {addr!r}, which does not resolve; "
            "set NodeAddr for it in slurm.conf or add it to /etc/hosts"
        ) from None
    return addr


def first_node_address(nodelist: str) -> str:
    return slurm_node_address(expand_nodelist(nodelist)[0])


def parse_launch_env(env: Mapping[str, str], resolve_master: Resolver = first_node_address) -> LaunchEnv:
    """Read the launcher's variables from ``env``; ``resolve_master`` maps a Slurm nodelist to rank 0's address."""
    if env.get("TORCHELASTIC_RUN_ID") or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")):
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return _checked(LaunchEnv(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK"),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // local_world),
            num_nodes=max(1, world // local_world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            job_id=env.get("TORCHELASTIC_RUN_ID", ""),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        ))
    if env.get("SUBMITIT_EXECUTOR") == "local":
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        return _checked(LaunchEnv(
            launcher="submitit-local",
            rank=_int(env, "SUBMITIT_LOCAL_GLOBALID", 0),
            world_size=world,
            local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0),
            local_world_size=world,
            node_rank=0,
            num_nodes=1,
            master_addr="127.0.0.1",
            master_port=port_for_job(job_id),
            job_id=job_id,
        ))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise LaunchEnvError("environment variable SLURM_JOB_ID is missing inside a Slurm step")
        node_rank = _int(env, "SLURM_NODEID", 0)
        world = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        restarts = _int(env, "SLURM_RESTART_COUNT", 0)
        return _checked(LaunchEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=tasks_on_node(per_node, node_rank),
            node_rank=node_rank,
            num_nodes=_int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1))),
            master_addr=resolve_master(nodelist) if world > 1 else "127.0.0.1",
            master_port=port_for_job(job_id, restarts),
            job_id=job_id,
            restart_count=restarts,
        ))
    return LaunchEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)


def _checked(le: LaunchEnv) -> LaunchEnv:
    if not 0 <= le.rank < le.world_size:
        raise LaunchEnvError(f"{le.launcher}: rank {le.rank} is outside world size {le.world_size}")
    if not 0 <= le.local_rank < le.local_world_size:
        raise LaunchEnvError(
            f"{le.launcher}: local rank {le.local_rank} is outside {le.local_world_size} tasks per node"
        )
    return le


# what init_distributed overwrote in os.environ, restored by shutdown(): a run inside a
# long-lived process (tests, a notebook) must not leave RANK/WORLD_SIZE/... behind, or every
# job it later submits (srun and submitit pass the environment on) would parse as torchrun
_OVERWRITTEN: dict[str, str | None] = {}


def export_env(le: LaunchEnv, environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str | None]:
    """Write the torch/DeepSpeed variables, so env:// initialisation sees exactly these values.

    Returns the previous values (None where a variable was unset)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    previous = {key: environ.get(key) for key in keys}
    environ.update({
        "RANK": str(le.rank),
        "WORLD_SIZE": str(le.world_size),
        "LOCAL_RANK": str(le.local_rank),
        "LOCAL_WORLD_SIZE": str(le.local_world_size),
        "MASTER_ADDR": le.master_addr,
        "MASTER_PORT": str(le.master_port),
    })
    return previous


def choose_device(local_rank: int, local_world_size: int, cuda_count: int | None = None) -> torch.device:
    """One GPU per task whether or not CUDA_VISIBLE_DEVICES was narrowed per task; CPU without CUDA."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        return torch.device("cpu")
    if count == 1:
        return torch.device("cuda", 0)  # this task sees exactly its own GPU
    if local_rank < count and count >= local_world_size:
        return torch.device("cuda", local_rank)
    raise LaunchEnvError(
        f"{local_world_size} tasks on this node but {count} visible GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one task per GPU"
    )


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def init_distributed(cfg: Config, environ: Mapping[str, str] | None = None) -> DistContext:
    """Parse the launcher's environment, pick the device, and start the process group.

    A process group exists afterwards in every case (a one-process group for a single run), so
    engines and collectives need no special case.
    """
    le = parse_launch_env(os.environ if environ is None else environ)
    previous = export_env(le)
    if not _OVERWRITTEN:
        _OVERWRITTEN.update(previous)
    device = choose_device(le.local_rank, le.local_world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.engine.collective_timeout_s)
    if not dist.is_initialized():
        if le.world_size == 1:
            # no rendezvous needed: an in-memory store, so parallel single-process runs never clash on ports
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(
                backend, init_method="env://", rank=le.rank, world_size=le.world_size, timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
    return DistContext(**dataclasses.asdict(le), device=device, backend=backend)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group (safe to call when none exists) and restore the launch variables."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _OVERWRITTEN.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _OVERWRITTEN.clear()
