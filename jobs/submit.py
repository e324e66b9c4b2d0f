"""Submit a flashdmd job: ``python jobs/submit.py JOB [options] [section.key=value ...]``.

Resolves and validates the whole config before anything is submitted, so a bad key or value
fails here with a message that names it.  ``--dry-run`` prints the job plan and exits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashdmd.config import DEFAULT_PRESET, Config, ConfigError, load_config  # noqa: E402
from jobs.plan import JOBS, build_plan, render  # noqa: E402

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


def resolve(args: argparse.Namespace) -> Config:
    options = [f"{key}={getattr(args, opt)}" for opt, key in OPTION_KEYS.items() if getattr(args, opt) is not None]
    cfg = load_config(args.config, [*args.overrides, *options])
    if not cfg.name:
        cfg.name = f"{Path(args.config).stem}-{args.job}"
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    plan = build_plan(args.job, args.config, cfg)
    if args.dry_run:
        print(render(plan, cfg, args.full_config))
        return 0
    print(f"{args.job}: training is not implemented yet; use --dry-run to see the job plan", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
