"""Training-health monitors in MLflow at every log step, checked against the
values they are derived from, and a warning plus a flag when one leaves its bound."""
from __future__ import annotations

import logging

import pytest
import scenarios


@pytest.mark.slow
def test_health_monitors_are_logged_and_flag_out_of_bounds(tmp_path, gmm_cache, caplog):
    caplog.set_level(logging.WARNING, logger="flashdmd.health")
    row = scenarios.health_monitors(tmp_path, gmm_cache)
    run1, run2 = row.detail["stage1_run"], row.detail["stage2_run"]
    steps = list(range(1, scenarios.ITERATIONS + 1))

    def values(run: str, key: str) -> dict[int, float]:
        return scenarios.metric_values(tmp_path, run, key)

    lag = values(run1, "health/fake_lag")
    assert sorted(lag) == steps and all(v > 0 for v in lag.values())
    assert sorted(values(run1, "health/out_of_bounds/fake_lag")) == steps  # bound 1e-9: flagged every step
    assert not any("out_of_bounds/d_logit_gap" in k for k in row.detail["stage1_keys"])  # bound 1e9: never
    gap, real, fake = values(run1, "health/d_logit_gap"), values(run1, "d_real"), values(run1, "d_fake")
    assert gap and all(gap[s] == pytest.approx(real[s] - fake[s]) for s in gap)
    # the DM gradient norm by student step: at each generator update (ttur=2: steps 1, 3, 5, 7) it is
    # that step's generator gradient norm, filed under exactly one of the student timesteps; the
    # window counts (steps/<metric>) say which log steps carry a fresh value (log_every=1)
    norms = values(run1, "generator_grad_norm")
    updated = [s for s, n in sorted(values(run1, "steps/generator_grad_norm").items()) if n > 0]
    assert updated == [1, 3, 5, 7]
    per_t = {k: values(run1, k) for k in row.detail["stage1_keys"] if k.startswith("health/dm_grad_norm/t")}
    assert per_t and {int(k.rsplit("t", 1)[1]) for k in per_t} <= {999, 749, 499, 249}
    fresh = {k: values(run1, f"steps/{k}") for k in per_t}
    for s in updated:
        filed = [k for k in per_t if fresh[k].get(s, 0) > 0]
        assert len(filed) == 1 and per_t[filed[0]][s] == pytest.approx(norms[s]), (s, filed)
    drift = values(run1, "health/latent_std_drift")
    assert drift[1] == 0.0 and values(run1, "health/latent_mean_drift")[1] == 0.0  # the reference is step 1
    assert any(v > 0 for s, v in drift.items() if s > 1)
    warned = [r.getMessage() for r in caplog.records if "health monitor fake_lag" in r.getMessage()]
    assert len(warned) >= len(steps) and "above its bound 1e-09" in warned[0]
    # stage 2: reward against diversity for one prompt
    reward, diversity = values(run2, "health/reward"), values(run2, "health/diversity")
    assert sorted(reward) == sorted(diversity) == [1, 2, 3] and all(v > 0 for v in diversity.values())
    assert sorted(values(run2, "health/out_of_bounds/diversity")) == [1, 2, 3]
