"""Kill -9 of one of two ranks (DDP over gloo) mid-step and mid-save: the other
rank fails fast instead of hanging to the collective timeout, and a rerun of the same command
resumes from the last valid checkpoint in the same MLflow run with every step recorded."""
from __future__ import annotations

import pytest
import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_kill_one_rank_mid_step(tmp_path, gmm_cache):
    row = scenarios.kill_rank(tmp_path, gmm_cache, "step")
    d = row.detail
    assert d["returncodes_first"][1] == -9 and d["returncodes_first"][0] != 0, row
    assert d["detected_after_s"] < scenarios.TIMEOUT_S + 10, row  # no hang past engine.collective_timeout_s
    assert d["valid_before_rerun"] == "step-00000004" and d["resumed_step"] == 4, row
    assert d["metric_steps"] == list(range(1, scenarios.ITERATIONS + 1)), row
    assert not row.data_lost and row.steps_lost == 0, row


def test_kill_one_rank_mid_save(tmp_path, gmm_cache):
    row = scenarios.kill_rank(tmp_path, gmm_cache, "save")
    d = row.detail
    assert d["returncodes_first"][1] == -9 and d["returncodes_first"][0] != 0, row
    assert d["detected_after_s"] < scenarios.TIMEOUT_S + 10, row
    # step 6's directory was left without its marker: ignored, the rerun starts from step 4
    assert d["partial_dirs"] == ["step-00000006"] and d["valid_before_rerun"] == "step-00000004", row
    assert d["resumed_step"] == 4 and d["metric_steps"] == list(range(1, scenarios.ITERATIONS + 1)), row
    assert not row.data_lost and row.steps_lost == 0 and row.steps_redone == 2, row
