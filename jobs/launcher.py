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

What a user sees: every task sets up logging first (``flashdmd.infra.logs``), so rank 0's INFO
lines (progress, "resuming run ...") reach the job log; for a local job, ``wait`` follows task 0's
log on the terminal. Ctrl-C while waiting on a local job: the tasks (same foreground process
group) save at the next step boundary and stop, the MLflow run is marked KILLED, and ``wait``
raises ``JobInterrupted``, which says how to resume; submitit's local controller is started with
SIGINT ignored, because on Ctrl-C it would otherwise kill the tasks one second later, mid-save.
A rerun whose config differs from the run directory's is refused before submission unless
``resume`` is set (``flashdmd.train.rundir``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
import torch
from submitit.core.utils import JobPaths

from flashdmd.config import REPO_ROOT, Config, ConfigError, config_from_dict, to_dict, validate
from flashdmd.infra.logs import setup_logging
from flashdmd.infra.tracking import COMMAND_ENV
from flashdmd.train.rundir import RESUME_ENV, check_run_dir
from jobs import cluster
from jobs.plan import JobPlan

ENTRIES = {
    "stage1": "flashdmd.train.main:main",
    "stage2": "flashdmd.train.main:main",
    "export": "flashdmd.apps.export:main",
    "sample": "flashdmd.apps.sample:main",
    "eval": "flashdmd.apps.evaluate:main",
    "watch": "flashdmd.apps.watch:main",
    "synth": "flashdmd.apps.synth:main",
}
TRAINING_JOBS = ("stage1", "stage2")
TOY_ENTRY = "flashdmd.apps.toy_plot:main"  # gmm2d has no images: its sample and eval jobs plot and measure points
QUIET_PROGRESS_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
SUBMITIT_LINE = re.compile(r"^(submitit |\S+ \w+ submitit: )")  # submitit's own lines, in its format or ours


class JobInterrupted(RuntimeError):
    """A local job stopped on Ctrl-C or TERM (after saving, when it had reached its loop)."""


def _load(entry: str) -> Callable[[Config, str], Any]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def entry_for(job: str, cfg: Config) -> str:
    """The function a job runs (``module:function``)."""
    if cfg.model.family == "gmm2d" and job in ("sample", "eval"):
        return TOY_ENTRY
    return ENTRIES[job]


def check_entry(entry: str, job: str) -> None:
    """Import the entry before anything is queued: a missing or broken entry fails here, not hours later."""
    try:
        _load(entry)
    except (ImportError, AttributeError) as err:
        raise cluster.ClusterError(f"job '{job}' runs {entry}, which this checkout cannot load: {err}") from None


class EntryJob:
    """What every task runs: ``entry(cfg, job)`` with the config rebuilt from plain data and ``env`` set."""

    def __init__(self, entry: str, job: str, config: dict[str, Any], pythonpath: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.entry = entry
        self.job = job
        self.config = config
        self.pythonpath = pythonpath
        self.env = env or {}

    def __call__(self) -> Any:
        # the local controller was started with SIGINT ignored; the task takes Ctrl-C again
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.update(self.env)
        for quiet in QUIET_PROGRESS_BARS:  # download/loading bars would bury the progress lines in the log
            os.environ.setdefault(quiet, "1")
        setup_logging(submitit.JobEnvironment().global_rank)
        for path in reversed(self.pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        cfg = validate(config_from_dict(self.config))
        try:
            return _load(self.entry)(cfg, self.job)
        except KeyboardInterrupt:  # Ctrl-C before the loop's own handler, or twice: stop without a traceback
            print(f"{self.job}: interrupted", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # submitit's fallback hook (signal before the loop started): run the same job again
        return submitit.helpers.DelayedSubmission(EntryJob(self.entry, self.job, self.config, self.pythonpath,
                                                           self.env))


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
    ("synth", "prompts"), ("synth", "out_dir"),
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


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is started: it inherits the disposition (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def submit(plan: JobPlan, cfg: Config, dependency: str = "", entry: str | None = None,
           pythonpath: list[str] | None = None, resume: bool = False) -> Submitted:
    """Submit ``plan`` (config already resolved and validated); returns at once, the job runs on.

    A training job whose config differs from its run directory's is refused (``cluster.ClusterError``
    listing the differences) unless ``resume``."""
    cfg = absolute(cfg)
    cfg.tracking.tags.setdefault("preset", Path(plan.preset).stem)
    if plan.job in TRAINING_JOBS:
        try:
            check_run_dir(cfg, resume)
        except ConfigError as err:
            raise cluster.ClusterError(str(err)) from None
    env = {COMMAND_ENV: " ".join(["jobs/submit.py", *sys.argv[1:]]) if sys.argv[0].endswith("submit.py")
           else f"jobs/launcher.submit({plan.job})"}
    if resume:
        env[RESUME_ENV] = "1"
    folder = cfg.run_dir / "submitit"
    # the job process unpickles EntryJob before anything else: it must find this repository
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO_ROOT), *pythonpath_from_env()]))
    entry = entry or entry_for(plan.job, cfg)
    paths = [str(REPO_ROOT), *(pythonpath or [])]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    check_entry(entry, plan.job)
    executor = make_executor(plan, cfg, folder, dependency)
    with _sigint_ignored():
        job = executor.submit(EntryJob(entry, plan.job, to_dict(cfg), paths, env))
    return Submitted(job=job, plan=plan, cfg=cfg, folder=folder)


class LogFollower:
    """Prints the new complete lines of a local job's task-0 stdout and stderr (submitit's own lines left out)."""

    def __init__(self, sub: Submitted) -> None:
        self.files = [(sub.stdout, sys.stdout), (sub.stderr, sys.stderr)]
        self.offsets = [0, 0]

    def poll(self) -> None:
        for i, (path, out) in enumerate(self.files):
            if not path.is_file():
                continue
            with open(path, "rb") as handle:
                handle.seek(self.offsets[i])
                data = handle.read()
            end = data.rfind(b"\n") + 1
            self.offsets[i] += end
            for line in data[:end].decode(errors="replace").splitlines():
                if not SUBMITIT_LINE.match(line):
                    print(line, file=out, flush=True)


def wait(sub: Submitted, timeout_s: float | None = None, poll_s: float = 2.0, follow: bool = False) -> list[Any]:
    """Block until every task has a result and return them (raises the job's error).

    ``follow``: print a local job's log while waiting. Ctrl-C while waiting on a local job lets it
    save and stop (``JobInterrupted``). Slurm states come from ``scontrol show job``, so this works
    without accounting (sacct).
    """
    deadline = None if timeout_s is None else time.time() + timeout_s
    folder = sub.job.paths.folder
    results = [JobPaths(folder, job_id=sub.job_id, task_id=t).result_pickle for t in range(_num_tasks(sub))]
    local = sub.plan.executor == "local"
    follower = LogFollower(sub) if follow and local else None
    with _term_as_interrupt(local):
        interrupted = _wait_for(sub, results, deadline, timeout_s, poll_s, follower)
    if follower is not None:
        follower.poll()
    missing = [str(path) for path in results if not path.exists()]
    if missing:
        if interrupted:
            raise JobInterrupted(f"{sub.plan.job} stopped after saving its last step; rerun the same command to "
                                 f"resume (run directory {sub.cfg.run_dir})")
        raise RuntimeError(
            f"job {sub.job_id} ended without writing {', '.join(missing)}; see {sub.stdout} and {sub.stderr}"
        )
    return sub.job.results()


def _wait_for(sub: Submitted, results: list[Path], deadline: float | None, timeout_s: float | None, poll_s: float,
              follower: LogFollower | None) -> bool:
    """Poll until the results exist or the job has ended; True when interrupted meanwhile."""
    local = sub.plan.executor == "local"
    interrupted = False
    while not all(path.exists() for path in results):
        try:
            if follower is not None:
                follower.poll()
            if local and sub.job.done():
                break
            if not local and cluster.job_state(sub.job_id) not in cluster.ACTIVE_STATES:
                time.sleep(poll_s)  # a result file may land just after the job leaves the queue
                break
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {sub.job_id} did not finish in {timeout_s} s; see {sub.stdout}")
            time.sleep(poll_s if follower is None else min(poll_s, 0.5))
        except KeyboardInterrupt:
            if not local:
                raise
            if not interrupted:  # the tasks got the Ctrl-C too; TERM reaches them if it came from elsewhere
                print("\nCtrl-C: the job saves at the end of its step and stops ...", file=sys.stderr, flush=True)
                _terminate_local(sub)
            interrupted = True
    return interrupted


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _term_as_interrupt(local: bool) -> Iterator[None]:
    """While waiting on a local job, TERM to this process is handled like Ctrl-C: the job saves and stops."""
    if not local or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate_local(sub: Submitted) -> None:
    # the local job id is the controller's pid; the controller forwards TERM to every task
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(sub.job_id), signal.SIGTERM)


def _num_tasks(sub: Submitted) -> int:
    params = sub.plan.executor_params
    return params.get("processes") or params["nodes"] * params["tasks_per_node"]


def pythonpath_from_env() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
