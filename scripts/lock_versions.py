"""Write constraints/tested.txt: the versions of flashdmd's dependencies installed in this Python.

Run it after the suite passed (``./scripts/test.sh``) in an environment that scripts/install.sh
set up, and commit the file: scripts/install.sh installs exactly these versions on every
machine, so a fresh machine tests what CI tested. The lock covers the dependency closure of
``flashdmd[test,lora]`` only (not whatever else this Python holds). torch is written without its
local build label (``2.13.0``, not ``2.13.0+cpu``): install.sh applies that pin only where no torch
is installed yet and keeps a cluster's own CUDA build otherwise.

    python scripts/lock_versions.py            # rewrite constraints/tested.txt
    python scripts/lock_versions.py --check    # exit 1 when the installed set differs from the lock
"""
from __future__ import annotations

import argparse
import configparser
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints" / "tested.txt"
EXTRAS = ("test", "lora")
HEADER = """\
# The versions the flashdmd suite was last run and passed with (Python {python}).
# Applied by scripts/install.sh (pip install -c); regenerate with `python scripts/lock_versions.py`
# after a passing ./scripts/test.sh. torch is pinned only for machines without a torch of their own.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def own_requirements(extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """flashdmd's requirements as setup.cfg states them now (an installed copy's metadata may be older)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for extra in extras for line in cfg["options.extras_require"][extra].splitlines()]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """canonical name -> installed version of every distribution flashdmd[extras] needs."""
    env = default_environment()
    done: dict[str, set[str]] = {}
    todo = [(req.name, set(req.extras)) for req in map(Requirement, own_requirements(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in done and wanted <= done[key]:
            continue
        done.setdefault(key, set()).update(wanted)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f"lock_versions: {name} is required but not installed; run scripts/install.sh first")
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted | {""}):
                todo.append((req.name, set(req.extras)))
    return {key: md.version(key).split("+")[0] if key == "torch" else md.version(key) for key in sorted(done)}


def render(pins: dict[str, str]) -> str:
    python = ".".join(map(str, sys.version_info[:3]))
    return HEADER.format(python=python) + "".join(f"{name}=={version}\n" for name, version in pins.items())


def pins_of(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the lock instead of writing it")
    args = parser.parse_args(argv)
    text = render(closure())
    if args.check:
        locked = pins_of(LOCK.read_text() if LOCK.exists() else "")
        differ = sorted(pins_of(text) ^ locked)
        for line in differ:
            print(("lock:      " if line in locked else "installed: ") + line)
        return 1 if differ else 0
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(text)
    print(f"lock_versions: wrote {len(pins_of(text))} pins to {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
