"""Fixtures shared by the training-run tests of this folder."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow_store import migrated_store


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One run root (and MLflow store) for a module's runs, which all have their own names: a new
    SQLite store costs seconds of MLflow migrations, which the migrated copy spares."""
    root = tmp_path_factory.mktemp("runs")
    migrated_store(root)
    return root
