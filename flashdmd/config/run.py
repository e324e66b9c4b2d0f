"""The ``launch``, ``tracking`` and ``checkpoint`` sections: where and how long a run goes, what
it logs to MLflow and how often it saves (jobs/submit.py, flashdmd/infra/tracking.py,
flashdmd/train/checkpoint.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashdmd.config.rules import Bound, Scope, setting

SLURM_ONLY = ("partition", "account", "qos", "constraint", "mem_gb")
MLFLOW_KEY, MLFLOW_VALUE = 250, 5000  # MLflow's limits on run names, tag keys and tag values


@dataclass
class LaunchConfig:
    executor: Literal["auto", "slurm", "local"] = "auto"
    nodes: int = setting(1, ge=1, le=4096)
    gpus_per_node: int = setting(1, ge=1, le=64)  # one task per GPU; on CPU the number of processes per node
    cpus_per_task: int = setting(8, ge=1, le=1024)
    mem_gb: int = setting(0, ge=0, le=2**20)  # 0 -> the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_minutes: int = setting(240, ge=1, le=366 * 24 * 60)
    signal_lead_s: int = setting(120, ge=0)  # Slurm sends USR1 this long before the time limit
    max_requeues: int = setting(3, ge=0, le=10**4)

    def validate(self, rules: Scope) -> None:
        rules.check(self.signal_lead_s < self.time_minutes * 60, ("signal_lead_s", "time_minutes"),
                    "must be shorter than launch.time_minutes")
        local = self.executor == "local"
        rules.check(not local or self.nodes == 1, ("nodes", "executor"),
                    "> 1 needs launch.executor=slurm (the local executor runs on this machine only)")
        given = [name for name in SLURM_ONLY if getattr(self, name)]
        rules.check(not local or not given, (*(given or ["executor"]), "executor"),
                    "is only read by launch.executor=slurm", "set launch.executor=slurm or leave it empty")


@dataclass
class TrackingConfig:
    uri: str = ""  # "" -> MLflow's embedded SQLite store under the run root
    experiment: str = setting("flashdmd", min_len=1, max_len=MLFLOW_KEY)
    run_name: str = setting("", max_len=MLFLOW_KEY)  # "" -> the run's name
    tags: dict[str, str] = setting({}, item=Bound(max_len=MLFLOW_VALUE))
    log_every: int = setting(10, ge=1)
    sample_every: int = setting(100, ge=0)
    sample_prompts: list[str] = setting(["a photo of a cat", "a red car on a street", "a bowl of fruit"], max_len=64)

    def validate(self, rules: Scope) -> None:
        rules.check(all(0 < len(k) <= MLFLOW_KEY for k in self.tags), "tags",
                    f"keys must have 1 to {MLFLOW_KEY} characters (MLflow's limit)")


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> <run_dir>/checkpoints
    every: int = setting(100, ge=1)
    keep_last: int = setting(3, ge=1, le=10**6)
