"""Submit a flashdmd job: ``python jobs/submit.py JOB [options] [section.key=value ...]``.

Resolves and validates the whole config before anything is submitted, so a bad key or value
fails here with a message that names it.  ``--dry-run`` prints the job plan and exits.
Otherwise the job goes through submitit (jobs/launcher.py): on Slurm the command returns once
the job is queued; on the local executor it waits for the job. ``pipeline`` submits stage 1,
then stage 2 with an ``afterok`` dependency on it and ``stage2.init_from`` set to stage 1's run
directory. Requests the cluster cannot serve (unknown partition, too many nodes, no sbatch)
fail before submission with a message saying what to change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashdmd.config import DEFAULT_PRESET, Config, ConfigError, default_run_name, load_config  # noqa: E402
from jobs.cluster import ClusterError  # noqa: E402
from flashdmd.apps.preflight import preflight_all  # noqa: E402
from jobs.plan import JOBS, PIPELINE, build_plan, render  # noqa: E402

# command-line option -> config key; options win over positional overrides
OPTION_KEYS = {
    "nodes": "launch.nodes",
    "gpus_per_node": "launch.gpus_per_node",
    "cpus_per_task": "launch.cpus_per_task",
    "mem": "launch.mem_gb",
    "partition": "launch.partition",
    "account": "launch.account",
    "qos": "launch.qos",
    "constraint": "launch.constraint",
    "time": "launch.time_minutes",
    "executor": "launch.executor",
    "name": "name",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/submit.py", description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name in jobs/configs or a YAML path")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int, help="one task per GPU (processes per node on CPU)")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--mem", type=int, help="memory per node in GB")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--time", type=int, help="time limit in minutes")
    parser.add_argument("--executor", choices=["auto", "slurm", "local"])
    parser.add_argument("--name", help="run name; the run directory is <run_root>/<name>")
    parser.add_argument("--dry-run", action="store_true", help="print the job plan and exit")
    parser.add_argument("--full-config", action="store_true", help="with --dry-run: print the whole resolved config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace, job: str | None = None) -> Config:
    """The validated config of ``job`` (default: the one asked for); pipeline stages get "<name>-<stage>"."""
    job = job or args.job
    options = [f"{key}={getattr(args, opt)}" for opt, key in OPTION_KEYS.items() if getattr(args, opt) is not None]
    cfg = load_config(args.config, [*args.overrides, *options])
    if job != args.job and cfg.name:  # pipeline with --name: one run directory per stage
        cfg.name = f"{cfg.name}-{job}"
    cfg.name = cfg.name or default_run_name(args.config, job)
    return cfg


def resolve_all(args: argparse.Namespace) -> list[tuple[str, Config]]:
    """(job, config) in submission order; stage 2 of a pipeline starts from stage 1's run directory."""
    if args.job != "pipeline":
        return [(args.job, resolve(args))]
    stage1, stage2 = (resolve(args, job) for job in PIPELINE)
    stage2.stage2.init_from = str(stage1.run_dir.resolve())
    return [("stage1", stage1), ("stage2", stage2)]


def run(args: argparse.Namespace, configs: list[tuple[str, Config]]) -> int:
    from jobs import launcher  # submitit and torch load only when something is submitted

    previous = None
    for job, cfg in configs:
        plan = build_plan(job, args.config, cfg)
        dependency = ""
        if previous is not None:
            if plan.executor == "slurm":
                dependency = f"afterok:{previous.job_id}"
            else:  # the local executor has no dependencies: wait for the previous stage here
                launcher.wait(previous)
        sub = launcher.submit(plan, cfg, dependency=dependency)
        print(sub.describe() + (f"\n  runs after:    {dependency}" if dependency else ""), flush=True)
        previous = sub
    if previous is not None and previous.plan.executor == "local":
        result = launcher.wait(previous)[0]
        print(f"{previous.plan.job} finished in {previous.cfg.run_dir}; rank 0 returned {result}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        configs = resolve_all(args)
        if not args.dry_run:
            preflight_all(configs)  # missing paths fail here, before anything is queued
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        plans = [render(build_plan(job, args.config, cfg), cfg, args.full_config) for job, cfg in configs]
        if len(plans) > 1:
            plans[1] += "\ndependency:     afterok on the stage-1 job (stage2.init_from = its run directory)"
        print("\n\n".join(plans))
        return 0
    try:
        return run(args, configs)
    except ClusterError as err:
        print(f"cannot submit: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- sbatch's own refusal (submitit FailedJobError) or a failed local job
        print(f"{args.job}: {type(err).__name__}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
