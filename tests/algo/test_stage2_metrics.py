"""Stage 2's logged RL statistics are global (spec 2.3): ``rl_reward``, ``rl_reward_gap`` and
``rl_kept`` are means over every rank's candidates and pairs, weighted by how many each rank
holds, from one all-reduce. Two DDP ranks with 16 and 8 prompts: the logged values equal the
single-process means over the union of both ranks' recorded scores, and differ from rank 0's
own mean and from the unweighted mean of the two ranks' means (so the test tells them apart)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_world import run_ranks


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gmm-cache-stage2-metrics")


@pytest.mark.distributed
def test_logged_rewards_are_weighted_means_over_all_ranks(tmp_path, cache):
    from reward_world import ddp_rl_scores

    run = run_ranks(2, ddp_rl_scores, str(cache), [16, 8], tmp=tmp_path)
    mine, theirs = run["scores.0"].double(), run["scores.1"].double()
    assert mine.shape[0] == 2 * theirs.shape[0] > 0  # uneven shares: the weighting matters
    union = torch.cat([mine, theirs])
    assert float(run["m.rl_reward"]) == pytest.approx(float(union.mean()), rel=1e-5, abs=1e-7)
    gap = union.amax(1) - union.amin(1)
    assert float(run["m.rl_reward_gap"]) == pytest.approx(float(gap.mean()), rel=1e-5, abs=1e-7)
    assert 0.0 <= float(run["m.rl_kept"]) <= 1.0
    unweighted = (mine.mean() + theirs.mean()) / 2
    assert abs(float(union.mean() - mine.mean())) > 1e-4 and abs(float(union.mean() - unweighted)) > 1e-4
