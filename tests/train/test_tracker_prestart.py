"""The MLflow writer that the trainer starts before its set-up (flashdmd.infra.tracking.start_writer):
it opens a new SQLite store (MLflow's tables) before any run is asked of it, and a writer whose
trainer failed during set-up exits cleanly without creating a run. Every training run of the suite
(``flashdmd.train.main``) records its MLflow run through such a writer."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import mlflow

from flashdmd.infra.tracking import discard_writer, start_writer


def _tables(db: Path) -> set[str]:
    if not db.is_file():
        return set()
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_writer_started_ahead_opens_the_store_and_a_discarded_one_creates_no_run(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    writer = start_writer(f"sqlite:///{db}")
    deadline = time.time() + 120
    while "runs" not in _tables(db) and time.time() < deadline and writer.poll() is None:
        time.sleep(0.1)
    assert "runs" in _tables(db), "the store was not opened ahead of the setup"
    assert writer.poll() is None  # still waiting for its run

    discard_writer(writer)  # the trainer's set-up failed
    assert writer.returncode == 0
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []

