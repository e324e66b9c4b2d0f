"""An empty MLflow SQLite store, already migrated, for a test's new run root.

MLflow builds a new SQLite store by replaying its whole schema history: seconds on a loaded
machine, which the first run under every fresh ``run_root`` (the default store is
``<run_root>/mlflow.db``) would wait out before its run exists. ``migrated_store`` migrates one
store per test process in a temporary folder and copies it into each root that asks; the runs
then find a store of the installed MLflow's schema, as they do in any existing run root. A new
store's creation stays covered by the tests that open one (tests/infra/test_tracking.py).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_MIGRATED: list[Path] = []  # this process's migrated empty store


def migrated_store(root: Path) -> Path:
    """``<root>/mlflow.db``, an empty migrated store unless the root has one already (kept as it is)."""
    target = root / "mlflow.db"
    if target.exists():
        return target
    if not _MIGRATED:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="flashdmd-tests-store-"))
        atexit.register(shutil.rmtree, folder, True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri())
        store.engine.dispose()  # every connection closed before the file is copied
        _MIGRATED.append(folder / "mlflow.db")
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MIGRATED[0], target)
    return target
