"""Read-only questions to the Slurm cluster, asked before submitting so mistakes fail early and clearly.

Every query has a timeout: an unreachable controller gives a message naming it, never a hang.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

QUERY_TIMEOUT_S = 20


class ClusterError(RuntimeError):
    """The request cannot run on this cluster; the message says what to change."""


@dataclass(frozen=True)
class Partition:
    name: str
    total_nodes: int
    max_nodes: int | None  # None = unlimited
    default: bool
    has_gpus: bool


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except FileNotFoundError:
        raise ClusterError(
            f"'{cmd[0]}' is not on PATH: this machine has no Slurm client; use --executor local"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"'{' '.join(cmd)}' did not answer in {QUERY_TIMEOUT_S} s: is slurmctld reachable?"
        ) from None
    if out.returncode != 0:
        raise ClusterError(f"'{' '.join(cmd)}' failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def require_sbatch() -> None:
    if not shutil.which("sbatch"):
        raise ClusterError("--executor slurm needs sbatch on PATH (run on a Slurm login node), or use --executor local")


def partitions() -> dict[str, Partition]:
    """All partitions with their node counts and whether their nodes offer GPUs (GRES gpu)."""
    found: dict[str, Partition] = {}
    for line in _run(["scontrol", "show", "partition", "--oneliner"]).splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "PartitionName" not in fields:
            continue
        name = fields["PartitionName"]
        max_nodes = fields.get("MaxNodes", "UNLIMITED")
        found[name] = Partition(
            name=name,
            total_nodes=int(fields.get("TotalNodes", "0")),
            max_nodes=None if max_nodes in ("UNLIMITED", "") else int(max_nodes),
            default=fields.get("Default") == "YES",
            has_gpus=_partition_has_gpus(name),
        )
    if not found:
        raise ClusterError("the Slurm cluster reports no partition")
    return found


def _partition_has_gpus(name: str) -> bool:
    gres = _run(["sinfo", "--noheader", "--partition", name, "--format", "%G"])
    return "gpu" in gres


def check_request(partition: str, nodes: int) -> Partition:
    """The partition the job will run in, after checking it exists and has ``nodes`` nodes."""
    parts = partitions()
    names = ", ".join(f"{p.name}{' (default)' if p.default else ''}" for p in parts.values())
    if partition:
        if partition not in parts:
            raise ClusterError(f"partition '{partition}' does not exist on this cluster; partitions: {names}")
        chosen = parts[partition]
    else:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ClusterError(f"the cluster has no default partition; choose one with --partition ({names})")
        chosen = defaults[0]
    limit = min(chosen.total_nodes, chosen.max_nodes or chosen.total_nodes)
    if nodes > limit:
        raise ClusterError(
            f"--nodes {nodes} is more than partition '{chosen.name}' offers ({limit} nodes); "
            "lower --nodes or pick another --partition"
        )
    return chosen


# states in which a job may still produce results (it is queued, running, or being requeued)
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def job_state(job_id: str) -> str:
    """The job's Slurm state, or "" once the controller has forgotten it."""
    return job_field(job_id, "JobState")


def job_field(job_id: str, name: str) -> str:
    """One field of ``scontrol show job`` (e.g. Restarts, ExitCode), "" when absent."""
    try:
        out = _run(["scontrol", "show", "job", job_id, "--oneliner"])
    except ClusterError:
        return ""
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""
