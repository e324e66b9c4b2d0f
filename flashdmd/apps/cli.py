"""What every app job shares: its command line (``--config``, then ``section.key=value`` overrides,
resolved by ``flashdmd.config.cli``) and the process group it runs in, set up and torn down once."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from flashdmd.config import DEFAULT_PRESET, Config, ConfigError
from flashdmd.config.cli import config_from_cli
from flashdmd.data.bad_samples import DataError
from flashdmd.infra.distributed import DistContext, barrier, init_distributed, shutdown

T = TypeVar("T")


def app_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m flashdmd.apps.<module>`` with the options every app takes."""
    parser = argparse.ArgumentParser(prog=f"python -m flashdmd.apps.{module}", description=description)
    parser.add_argument("--config", default=DEFAULT_PRESET, help="the training run's preset name or YAML path")
    return parser


def parse_app_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                   job: str = "stage1") -> tuple[argparse.Namespace, Config]:
    """Parse ``argv`` (default: the process's) and resolve the config of the run ``job`` names."""
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return args, config_from_cli(args.config, args.overrides, job)


def on_ranks(cfg: Config, body: Callable[[DistContext], T], wait_for_all: bool = False) -> T:
    """Run ``body`` on this rank inside the job's process group, which is shut down however it ends.
    ``wait_for_all``: no rank returns before every rank's body is done (rank 0's files and MLflow
    points exist when any rank returns)."""
    ctx = init_distributed(cfg)
    try:
        result = body(ctx)
        if wait_for_all:
            barrier()
        return result
    finally:
        shutdown()


def exit_code(job: str, run: Callable[[], T], done: Callable[[T], str]) -> int:
    """0 after printing ``done(run())``; 2 after one line naming what to fix when the job's input is wrong."""
    try:
        result = run()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"{job} error: {err}", file=sys.stderr)
        return 2
    print(done(result))
    return 0
