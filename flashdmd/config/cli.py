"""The config part every module CLI shares (train, export, sample, eval, watch): logging set up,
the preset and overrides resolved, a config error printed as one line and exit status 2, and the
default run name, so ``python -m flashdmd.X --config P`` finds the run ``jobs/submit.py`` names."""
from __future__ import annotations

import logging
import sys

from flashdmd.config import Config, ConfigError, default_run_name, load_config


def config_from_cli(preset: str, overrides: list[str], name_job: str) -> Config:
    """The validated config, named ``<preset>-<name_job>`` unless ``name`` is set; exits 2 on a config error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(preset, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg.name = cfg.name or default_run_name(preset, name_job)
    return cfg
