"""Is this config the run directory's? A rerun resumes only the run it was started as.

Rerunning a command resumes the newest valid checkpoint of ``<run_root>/<name>`` (DESIGN.md).
When the config differs from the ``config.yaml`` saved there, the rerun is a different
experiment under an old name, and resuming it silently mixes two runs. ``config_differences``
lists what differs; ``check_run_dir`` refuses with that list unless resuming was asked for
(``--resume`` of jobs/submit.py and ``python -m flashdmd.train``, which set ``FLASHDMD_RESUME=1``
for every rank). Left out of the comparison: ``launch.*`` (resources and requeue policy may change
between submissions of one run), and the spelling of paths (relative vs absolute).
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from flashdmd.config import Config, ConfigError, flatten, to_dict

RESUME_ENV = "FLASHDMD_RESUME"
IGNORED_PREFIXES = ("launch.",)
SHOWN = 12  # differences listed before "... and N more"


def resume_asked() -> bool:
    return os.environ.get(RESUME_ENV, "") not in ("", "0")


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and "://" not in a + b:
        return os.path.abspath(a) == os.path.abspath(b)
    return False


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``key: saved -> now`` for every compared key whose value differs."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    keys = sorted(k for k in set(old) | set(new) if not k.startswith(IGNORED_PREFIXES))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys
            if not _same(old.get(k), new.get(k))]


def check_run_dir(cfg: Config, resume: bool | None = None) -> list[str]:
    """Raise ConfigError when ``cfg`` differs from the run directory's saved config and resuming was not
    asked for; returns the differences (empty for a new run directory or the same config)."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return []
    differences = config_differences(yaml.safe_load(path.read_text()) or {}, cfg)
    if differences and not (resume_asked() if resume is None else resume):
        shown = differences[:SHOWN] + ([f"... and {len(differences) - SHOWN} more"] if len(differences) > SHOWN else [])
        raise ConfigError(
            f"run directory {cfg.run_dir} holds a run with another config ({path}):\n  "
            + "\n  ".join(shown)
            + "\nRerun with --resume to continue that run with this config, or choose another --name (name=...)."
        )
    return differences
