"""The job plan: what a submission would run, where, and with which resolved config.

Pure description, no side effects: ``build_plan`` turns a job name, a resolved config and the
preset it came from into a ``JobPlan``; ``render`` prints it for ``--dry-run``.  The launchers use
the same plan, so the dry run shows exactly what a real submission does.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashdmd.config import Config, ConfigError, diff, load_config, to_yaml
from flashdmd.config.run import SLURM_ONLY

JOBS = ("stage1", "stage2", "pipeline", "export", "sample", "eval", "watch", "synth")
PIPELINE = ("stage1", "stage2")  # stage 2 runs after stage 1 succeeded (afterok), from its run directory


@dataclass
class JobPlan:
    job: str
    preset: str
    executor: str  # resolved: slurm or local
    world_size: int
    run_dir: Path
    checkpoint_dir: Path
    tracking_uri: str
    experiment: str
    executor_params: dict[str, Any] = field(default_factory=dict)
    config_diff: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def resolve_executor(choice: str) -> str:
    """auto -> slurm where sbatch is on PATH, else local."""
    if choice == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return choice


def slurm_params(cfg: Config) -> dict[str, Any]:
    """sbatch parameters for one task per GPU (spec: submitit's slurm_* names)."""
    launch = cfg.launch
    params: dict[str, Any] = {
        "nodes": launch.nodes,
        "tasks_per_node": launch.gpus_per_node,
        "gpus_per_node": launch.gpus_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "timeout_min": launch.time_minutes,
        "signal_delay_s": launch.signal_lead_s,
        "max_requeues": launch.max_requeues,
    }
    optional = {
        "mem_gb": launch.mem_gb,
        "partition": launch.partition,
        "account": launch.account,
        "qos": launch.qos,
        "constraint": launch.constraint,
    }
    params.update({k: v for k, v in optional.items() if v})
    return params


def local_params(cfg: Config) -> dict[str, Any]:
    """submitit's local executor: every task on this machine, one per GPU where there are GPUs."""
    return {"processes": cfg.world_size, "timeout_min": cfg.launch.time_minutes}


def check_executor(cfg: Config, executor: str) -> None:
    """Refuse Slurm-only settings when ``launch.executor=auto`` resolved to the local executor."""
    launch = cfg.launch
    given = [f"launch.{k}={getattr(launch, k)!r}" for k in SLURM_ONLY if getattr(launch, k)]
    given += [f"launch.nodes={launch.nodes}"] if launch.nodes > 1 else []
    if executor == "local" and given:
        raise ConfigError(f"{', '.join(given)}: needs the Slurm executor, but launch.executor={launch.executor} "
                          "runs this job on this machine (no sbatch on PATH); submit from a Slurm login node "
                          "or drop these settings")


def build_plan(job: str, preset: str, cfg: Config) -> JobPlan:
    """The plan of ``job``; raises ConfigError for settings the resolved executor would ignore."""
    executor = resolve_executor(cfg.launch.executor)
    check_executor(cfg, executor)
    params = slurm_params(cfg) if executor == "slurm" else local_params(cfg)
    return JobPlan(
        job=job,
        preset=preset,
        executor=executor,
        world_size=cfg.world_size,
        run_dir=cfg.run_dir,
        checkpoint_dir=cfg.checkpoint_dir,
        tracking_uri=cfg.tracking_uri,
        experiment=cfg.tracking.experiment,
        executor_params=params,
        config_diff=diff(cfg, load_config(preset, check=False)),
    )


def render(plan: JobPlan, cfg: Config, full_config: bool) -> str:
    lines = [
        f"job:            {plan.job}",
        f"preset:         {plan.preset}",
        f"executor:       {plan.executor}",
        f"nodes:          {cfg.launch.nodes}",
        f"gpus per node:  {cfg.launch.gpus_per_node}",
        f"world size:     {plan.world_size} ({cfg.launch.nodes} x {cfg.launch.gpus_per_node})",
        f"engine:         {cfg.engine.kind} ({cfg.engine.precision})",
        f"run directory:  {plan.run_dir}",
        f"checkpoints:    {plan.checkpoint_dir} (every {cfg.checkpoint.every} steps, keep {cfg.checkpoint.keep_last})",
        f"mlflow:         {plan.tracking_uri} (experiment '{plan.experiment}', run '{cfg.tracking.run_name or cfg.name}')",
        "executor parameters:",
        *(f"  {k}: {v}" for k, v in plan.executor_params.items()),
    ]
    if full_config:
        lines += ["resolved config:", *("  " + line for line in to_yaml(cfg).splitlines())]
    else:
        lines.append("changes from the preset:" if plan.config_diff else "changes from the preset: none")
        lines += [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in plan.config_diff.items()]
    return "\n".join(lines)
