"""The reproducibility bundle of a run: git state, package versions and the shard list.

DESIGN.md ("run" layer) asks that every run records what produced it.  The bundle is a plain
JSON-able dict, logged by ``flashdmd.infra.tracking`` as an artifact next to the resolved config.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import braceexpand

from flashdmd.config import REPO_ROOT, Config

# the packages whose versions change numerics or checkpoint formats
TRACKED_PACKAGES = ("torch", "diffusers", "transformers", "deepspeed", "mlflow", "webdataset", "peft", "numpy")

# a brace pattern for 10^6 shards is fine to expand; listing it in a JSON artifact is not
MAX_LISTED_SHARDS = 10_000


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or "", "dirty": bool or None}``; empty when ``repo`` is not a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed version of each package, or "not installed"."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def shard_list(pattern: str) -> list[str]:
    """The shard URLs a WebDataset brace pattern names (``::`` separates several patterns)."""
    if not pattern:
        return []
    urls: list[str] = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def repro_bundle(cfg: Config) -> dict[str, Any]:
    """Everything needed to say what produced a run, besides the resolved config itself."""
    shards = shard_list(cfg.data.shards)
    return {
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "packages": package_versions(),
        "num_shards": len(shards),
        "shards": shards[:MAX_LISTED_SHARDS],
    }
