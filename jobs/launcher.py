"""Submit a planned job through submitit: Slurm (one task per GPU) or the local executor.

The callable that submitit pickles (``EntryJob``) carries the resolved config as plain data and
the name of the entry function (``flashdmd.train.main:main`` for stage 1 and 2), so a job never
depends on the submitting process' objects. Resume state is never stored in the pickle: the
entry finds the newest valid checkpoint at start-up (fairchem #1055), which is what makes a
requeued job, or a requeue of the original pickle, continue where it stopped.

Preemption is handled inside the run (flashdmd.train.preemption: flag, agreement, collective save,
``scontrol requeue``). submitit's own signal hook stays as the fallback for a signal that
arrives before the training loop has installed its handlers: it then calls
``EntryJob.checkpoint``, which resubmits the same job unchanged.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
import torch
from submitit.core.utils import JobPaths

from flashdmd.config import REPO_ROOT, Config, config_from_dict, to_dict, validate
from jobs import cluster
from jobs.plan import JobPlan

ENTRIES = {
    "stage1": "flashdmd.train.main:main",
    "stage2": "flashdmd.train.main:main",
    "export": "flashdmd.apps.export:main",
    "sample": "flashdmd.apps.sample:main",
    "eval": "flashdmd.apps.evaluate:main",
    "watch": "flashdmd.apps.watch:main",
}


def _load(entry: str) -> Callable[[Config, str], Any]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def check_entry(entry: str, job: str) -> None:
    """Import the entry before anything is queued: a missing or broken entry fails here, not hours later."""
    try:
        _load(entry)
    except (ImportError, AttributeError) as err:
        raise cluster.ClusterError(f"job '{job}' runs {entry}, which this checkout cannot load: {err}") from None


class EntryJob:
    """What every task runs: ``entry(cfg, job)`` with the config rebuilt from plain data."""

    def __init__(self, entry: str, job: str, config: dict[str, Any], pythonpath: list[str]) -> None:
        self.entry = entry
        self.job = job
        self.config = config
        self.pythonpath = pythonpath

    def __call__(self) -> Any:
        for path in reversed(self.pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        cfg = validate(config_from_dict(self.config))
        return _load(self.entry)(cfg, self.job)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # submitit's fallback hook (signal before the loop started): run the same job again
        return submitit.helpers.DelayedSubmission(EntryJob(self.entry, self.job, self.config, self.pythonpath))


@dataclass
class Submitted:
    job: submitit.Job
    plan: JobPlan
    cfg: Config
    folder: Path

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    @property
    def stdout(self) -> Path:
        return self.job.paths.stdout

    @property
    def stderr(self) -> Path:
        return self.job.paths.stderr

    def describe(self) -> str:
        cfg = self.cfg
        lines = [
            f"submitted {self.plan.job} as {self.plan.executor} job {self.job_id}",
            f"  logs:          {self.stdout}  (task 0; errors in {self.stderr.name})",
            f"  run directory: {cfg.run_dir}",
            f"  mlflow:        {cfg.tracking_uri}  experiment '{cfg.tracking.experiment}', "
            f"run '{cfg.tracking.run_name or cfg.name}'",
        ]
        if not cfg.tracking.uri:
            lines.append(f"  browse with:   mlflow ui --backend-store-uri {cfg.tracking_uri}")
        if self.plan.executor == "slurm":
            lines.append(f"  follow with:   squeue -j {self.job_id}; tail -f {self.stdout}")
        return "\n".join(lines)


# local paths a job reads or writes; hub ids and URLs in other keys are left alone
PATH_KEYS = (
    ("checkpoint", "dir"), ("model", "cache_dir"), ("data", "shards"), ("data", "prompts"), ("stage2", "init_from"),
    ("eval", "prompts"), ("eval", "reference_images"), ("eval", "source"), ("eval", "out_dir"),
    ("sample", "source"), ("sample", "prompts_file"), ("sample", "out_dir"), ("export", "source"), ("export", "out_dir"),
)


def _absolute_path(value: str) -> str:
    """A relative local path (or shard pattern) made absolute; URLs, pipes and empty values unchanged."""
    if not value or "://" in value or value.startswith("pipe:") or Path(value).is_absolute():
        return value
    path = Path(value)
    return str(path.resolve()) if path.exists() or path.parent.exists() else value


def absolute(cfg: Config) -> Config:
    """Paths the job sees must not depend on the directory it starts in."""
    cfg.run_root = str(Path(cfg.run_root).resolve())
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        setattr(obj, key, _absolute_path(getattr(obj, key)))
    return cfg


def make_executor(plan: JobPlan, cfg: Config, folder: Path, dependency: str = "") -> submitit.AutoExecutor:
    """A submitit executor for ``plan``; for Slurm, the request is checked against the cluster first."""
    params = plan.executor_params
    if plan.executor == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(
            timeout_min=params["timeout_min"],
            tasks_per_node=params["processes"],
            nodes=1,
            gpus_per_node=min(params["processes"], torch.cuda.device_count()),
        )
        return executor
    cluster.require_sbatch()
    partition = cluster.check_request(params.get("partition", ""), params["nodes"])
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=params["max_requeues"])
    # a partition without GPUs (CPU clusters, the test cluster) runs one process per "GPU" slot
    gpus = params["gpus_per_node"] if partition.has_gpus else None
    extra: dict[str, Any] = {
        "signal": f"USR1@{params['signal_delay_s']}",  # flashdmd.train.preemption's signal, not submitit's USR2
        "requeue": True,
    }
    if dependency:
        extra["kill-on-invalid-dep"] = "yes"  # stage 2 is cancelled when stage 1 fails, not left pending forever
    executor.update_parameters(
        name=cfg.name,
        nodes=params["nodes"],
        tasks_per_node=params["tasks_per_node"],
        cpus_per_task=params["cpus_per_task"],
        timeout_min=params["timeout_min"],
        **({"gpus_per_node": gpus} if gpus else {}),
        **({"mem_gb": params["mem_gb"]} if params.get("mem_gb") else {}),
        slurm_partition=partition.name,
        **{f"slurm_{k}": params[k] for k in ("account", "qos", "constraint") if params.get(k)},
        slurm_signal_delay_s=params["signal_delay_s"],
        slurm_additional_parameters=extra,
        slurm_setup=[
            "export SUBMITIT_PREEMPT_SIGNAL=USR1",
            f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
        ],
        **({"slurm_dependency": dependency} if dependency else {}),
    )
    return executor


def submit(plan: JobPlan, cfg: Config, dependency: str = "", entry: str | None = None,
           pythonpath: list[str] | None = None) -> Submitted:
    """Submit ``plan`` (config already resolved and validated); returns at once, the job runs on."""
    cfg = absolute(cfg)
    folder = cfg.run_dir / "submitit"
    # the job process unpickles EntryJob before anything else: it must find this repository
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO_ROOT), *pythonpath_from_env()]))
    entry = entry or ENTRIES[plan.job]
    paths = [str(REPO_ROOT), *(pythonpath or [])]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    check_entry(entry, plan.job)
    executor = make_executor(plan, cfg, folder, dependency)
    job = executor.submit(EntryJob(entry, plan.job, to_dict(cfg), paths))
    return Submitted(job=job, plan=plan, cfg=cfg, folder=folder)


def wait(sub: Submitted, timeout_s: float | None = None, poll_s: float = 2.0) -> list[Any]:
    """Block until every task has a result and return them (raises the job's error).

    Slurm states come from ``scontrol show job``, so this works without accounting (sacct).
    """
    deadline = None if timeout_s is None else time.time() + timeout_s
    folder = sub.job.paths.folder
    results = [JobPaths(folder, job_id=sub.job_id, task_id=t).result_pickle for t in range(_num_tasks(sub))]
    while not all(path.exists() for path in results):
        if sub.plan.executor == "local" and sub.job.done():
            break
        if sub.plan.executor == "slurm" and cluster.job_state(sub.job_id) not in cluster.ACTIVE_STATES:
            time.sleep(poll_s)  # a result file may land just after the job leaves the queue
            break
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"job {sub.job_id} did not finish in {timeout_s} s; see {sub.stdout}")
        time.sleep(poll_s)
    missing = [str(path) for path in results if not path.exists()]
    if missing:
        raise RuntimeError(
            f"job {sub.job_id} ended without writing {', '.join(missing)}; see {sub.stdout} and {sub.stderr}"
        )
    return sub.job.results()


def _num_tasks(sub: Submitted) -> int:
    params = sub.plan.executor_params
    return params.get("processes") or params["nodes"] * params["tasks_per_node"]


def pythonpath_from_env() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
