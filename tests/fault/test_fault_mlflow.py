"""The MLflow server is killed (SIGKILL) during a training run and restarted
later on the same port and store: training never stops, and the run ends up with every step's
metrics (buffered by the writer, or synced from the run's metrics.jsonl) and status FINISHED."""
from __future__ import annotations

import pytest
import scenarios


@pytest.mark.slow
def test_mlflow_server_killed_and_restarted_mid_run(tmp_path, gmm_cache):
    row = scenarios.mlflow_outage(tmp_path, gmm_cache)
    assert row.detail["returncode"] == 0, (tmp_path / "outage-train.log").read_text()[-3000:]
    assert row.detail["killed_at"] >= 5 and row.detail["restarted_at"] >= 15, row
    assert row.steps_lost == 0 and not row.data_lost, row
