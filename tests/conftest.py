"""Suite-wide setup: the shared tiny-run fixtures ("worlds") in tests/worlds/ are importable from
every test folder, and MLflow never writes into the working directory.

A test (or a process it starts) that reaches MLflow without naming a store would get MLflow's
default, ``./mlflow.db`` with a "Default" experiment whose artifacts go to ``./mlruns``, in the
checkout. MLFLOW_TRACKING_URI points such calls at a store in this session's temporary folder;
the runs under test name their own store (``cfg.tracking_uri``) and are unaffected.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

WORLDS = Path(__file__).resolve().parent / "worlds"
if str(WORLDS) not in sys.path:
    sys.path.insert(0, str(WORLDS))

_MLFLOW_DIR = tempfile.mkdtemp(prefix="flashdmd-tests-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR}/mlflow.db"  # also over a user's own server


def pytest_unconfigure(config):
    shutil.rmtree(_MLFLOW_DIR, ignore_errors=True)
