"""The one rule for whether a weights source is a Hugging Face hub id or a local path.

The preflight (flashdmd/apps/preflight.py) and the model loader (flashdmd/nets/load.py) both
use it, so a value that passes the preflight as a hub id is fetched as one, and a value the
loader reads as a folder is probed as a folder before submission. A hub id is ``org/name``
exactly as the hub spells repo ids (letters, digits, ``-``, ``_``, ``.``; no ``..``; at most 96
characters each side) and is not an existing local path; everything else (``/abs``, ``./rel``,
``~/x``, ``file:...``, ``name``, ``a/b/c``, a file name with a weights suffix) is a local path.
"""
from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".yaml", ".txt", ".jsonl")


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path."""
    return (_HUB_ID.fullmatch(source) is not None and ".." not in source and not source.endswith(FILE_SUFFIXES)
            and not Path(source).exists())


def is_local_path(source: str) -> bool:
    """Anything that is not a hub id: the loader reads it from disk, the preflight checks it exists."""
    return not is_hub_id(source)


def local_path(source: str) -> Path:
    """The path a local source names (``file:`` prefix and ``~`` resolved)."""
    return Path(source.removeprefix("file:")).expanduser()
