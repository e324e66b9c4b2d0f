"""Fixtures of the fault matrix: tests/worlds on the import path (mlflow_server), one toy-teacher cache."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "worlds"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from scenarios import build_cache


@pytest.fixture(scope="session")
def gmm_cache(tmp_path_factory) -> Path:
    """The gmm2d teacher, trained once for every fault test (multi-rank runs must not race to build it)."""
    return build_cache(tmp_path_factory.mktemp("gmm-cache"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Where the tiny-sdxl preset's networks are written once for the training runs over corrupt data."""
    return tmp_path_factory.getbasetemp() / "nets-cache"  # the session's, shared with tests/nets/test_nets_*
