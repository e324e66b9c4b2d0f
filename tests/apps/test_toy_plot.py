"""The sample and eval jobs on a trained gmm2d run: a scatter plot (truth | teacher | student) as the
"sample grid", the exact metrics with a teacher row as the eval table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flashdmd.apps import toy_plot
from flashdmd.config import load_config
from flashdmd.train.main import main
from jobs.launcher import entry_for


@pytest.mark.slow  # a gmm2d run, then its teacher sampled: tens of seconds
def test_gmm2d_sample_scatter_and_eval_table(tmp_path: Path):
    overrides = [f"run_root={tmp_path}", "name=toy", f"model.cache_dir={tmp_path / 'cache'}",
                 "model.gmm.teacher_steps=300", "data.batch_size=64", "stage1.iterations=4", "checkpoint.every=4",
                 "tracking.sample_every=0"]
    main(load_config("gmm2d", overrides), "stage1")

    cfg = load_config("gmm2d", overrides)
    assert entry_for("sample", cfg) == entry_for("eval", cfg) == "flashdmd.apps.toy_plot:main"
    out = toy_plot.main(cfg, "sample")
    assert out == tmp_path / "toy" / "samples" / "step-00000004"
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 2.5 * grid.size[1]  # three panels side by side
    record = json.loads((out / "samples.json").read_text())
    assert record["family"] == "gmm2d" and record["step"] == 4
    assert 0 < record["metrics"]["eval/sw2"] and record["metrics"]["eval/sw2_floor"] < record["metrics"]["eval/sw2_teacher"]

    result = toy_plot.main(load_config("gmm2d", overrides), "eval")
    assert result.step == 4 and set(result.metrics) >= {"sw2", "modes_covered", "mean_reward"}
    (teacher,) = result.baselines
    assert teacher["nfe"] == 50 and teacher["metrics"]["sw2"] == record["metrics"]["eval/sw2_teacher"]
    table = (tmp_path / "toy" / "eval" / "step-00000004" / "results.md").read_text()
    assert "teacher" in table and "sw2" in table
