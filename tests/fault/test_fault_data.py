"""Corrupt images at 0.1 %, 1 % and 10 % of 1000 samples in real tar shards,
read through the trainer's image stream with data.max_bad_fraction=0.05: below the threshold the
epoch completes with every good sample delivered and every bad one counted; above it the stream
stops with an error naming the fraction, the rule, the reason and the shard. Then the trainer's
side in a few steps of a tiny-sdxl run: one bad image is skipped and counted in MLflow; at 10 %
the run stops once the judging window (data.bad_check_after) is read."""
from __future__ import annotations

import pytest
import scenarios


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.1])
def test_corrupt_fraction(tmp_path, rate):
    row = scenarios.corrupt_data(tmp_path, rate)
    assert not row.data_lost and "FAILED" not in row.outcome, row
    if rate < scenarios.MAX_BAD:
        assert row.detail["counts"] == {"corrupt_image": round(scenarios.SAMPLES * rate)}
        assert row.detail["undelivered_good"] == 0
    else:  # judged after data.bad_check_after=100 items: stops within the first shard
        assert row.detail["delivered_before_stop"] < 100


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.001, 0.1])
def test_corrupt_fraction_in_a_training_run(tmp_path, tiny_cache, rate):
    row = scenarios.corrupt_training(tmp_path, tiny_cache, rate)
    assert not row.data_lost and "FAILED" not in row.outcome, row
    if rate < scenarios.MAX_BAD:  # the one bad image (key 0) is in the first batch
        assert row.detail["skipped_keys"] == ["00000000"]
        assert row.detail["logged"][scenarios.TRAIN_ITERATIONS] == 1
    else:  # every 10th sample is bad (keys 0, 10, 20, ...): judged once the window is read
        seen = scenarios.TRAIN_CHECK_AFTER + 1
        assert f"{len(range(0, seen, 10))} of {seen} input items are bad" in row.detail["error"], row
