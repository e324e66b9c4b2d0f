"""A NaN/Inf loss or gradient skips the update on every rank and is counted;
N in a row roll back to the last valid checkpoint at lower learning rates, or stop clearly."""
from __future__ import annotations

import pytest
import scenarios
import torch
from torch import nn

from flashdmd.engine.base import OptimSpec
from flashdmd.engine.local import LocalEngine
from flashdmd.train.faults import parse_faults


def _engine() -> LocalEngine:
    engine = LocalEngine()
    engine.setup({"net": nn.Linear(3, 1)}, {"net": OptimSpec(lr=0.1, weight_decay=0.0)}, {})
    return engine


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_engine_skips_a_non_finite_update_and_keeps_optimizer_state(poison):
    engine = _engine()
    x = torch.ones(4, 3)
    engine.backward("net", engine["net"](x).pow(2).mean())
    engine.step("net")  # one good step: Adam has state now
    before = {k: v.clone() for k, v in engine["net"].state_dict().items()}
    adam = {k: v.clone() for k, v in engine.optimizers["net"].state[engine["net"].weight].items()}
    out = engine["net"](x).pow(2).mean()
    handle = None
    if poison == "loss":
        out = out + float("inf")  # a finite gradient under an infinite loss is still skipped
    else:
        handle = engine["net"].weight.register_hook(lambda g: g * float("nan"))
    engine.backward("net", out)
    result = engine.step("net")
    if handle is not None:
        handle.remove()
    assert result["skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in engine["net"].state_dict().items())
    assert all(torch.equal(adam[k], v) for k, v in engine.optimizers["net"].state[engine["net"].weight].items())
    assert engine.schedules["net"].steps_done == 1 and engine["net"].weight.grad is None
    engine.backward("net", engine["net"](x).pow(2).mean())
    assert "skipped" not in engine.step("net")  # the next good step goes through


def test_fault_spec_parsing_names_bad_items():
    (fault,) = parse_faults("kill_save@6:rank=1")
    assert (fault.kind, fault.step, fault.rank, fault.net) == ("kill_save", 6, 1, "generator")
    with pytest.raises(ValueError, match="bad fault 'explode@3'"):
        parse_faults("explode@3")
    with pytest.raises(ValueError, match="unknown option 'rnk'"):
        parse_faults("nan_loss@3:rnk=1")


@pytest.mark.parametrize("spec,label", [("nan_loss@3", "NaN loss"), ("inf_grad@3:net=fake_score", "Inf gradients")])
def test_one_bad_step_is_skipped_and_counted(tmp_path, gmm_cache, spec, label):
    row = scenarios.nonfinite_skip(tmp_path, gmm_cache, spec, label)
    assert not row.data_lost and row.steps_lost == 0, row
    assert row.detail["skipped_steps"][2] == 0 and row.detail["skipped_steps"][3] == 1


def test_consecutive_bad_steps_roll_back_with_lower_lr(tmp_path, gmm_cache):
    row = scenarios.nonfinite_rollback(tmp_path, gmm_cache)
    assert not row.data_lost and row.steps_lost == 0, row


def test_consecutive_bad_steps_stop_with_a_clear_message(tmp_path, gmm_cache):
    row = scenarios.nonfinite_stop(tmp_path, gmm_cache)
    assert not row.data_lost, row


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_step_on_one_rank_is_skipped_on_both(tmp_path, gmm_cache):
    row = scenarios.nonfinite_two_ranks(tmp_path, gmm_cache)
    assert not row.data_lost and row.steps_lost == 0, row


def test_guard_counts_and_a_resumed_run_keeps_the_lowered_rates():
    from flashdmd.config import HealthConfig
    from flashdmd.train.guard import OK, ROLLBACK, SKIPPED, StepGuard, TrainingHealthError

    guard = StepGuard(HealthConfig(max_consecutive_nonfinite=2, max_rollbacks=1), _engine())
    assert guard.check(1, {"loss": 1.0, "net_grad_norm": float("nan")}) == OK  # a norm alone is not judged
    assert guard.check(2, {"loss": float("inf")}) == SKIPPED
    assert guard.check(3, {"net_skipped": 1.0}) == ROLLBACK
    guard.rolled_back(1)
    assert guard.engine.schedules["net"].lr == pytest.approx(0.05)
    fresh = StepGuard(HealthConfig(), _engine())  # the restarted job: a new engine at the configured rate
    fresh.load_state_dict(guard.state_dict())
    assert fresh.engine.schedules["net"].lr == pytest.approx(0.05) and fresh.skipped == 2 and fresh.rollbacks == 1
    assert guard.check(4, {"loss": float("nan")}) == SKIPPED
    with pytest.raises(TrainingHealthError, match=r"2 consecutive steps \(4\.\.5\).*max_rollbacks=1"):
        guard.check(5, {"loss": float("nan")})


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "deepspeed"])
def test_every_engine_skips_non_finite_updates_the_same_way(tmp_path, kind):
    """The policy of flashdmd/engine/base.py under DDP, FSDP2 and ZeRO-3 (local: the test above): a NaN
    gradient and an Inf loss with finite gradients each leave weights, Adam moments and the
    schedule as the good step before left them; the next good step goes through."""
    from engine_world import run_ranks
    from nonfinite_world import poisoned_steps

    out = run_ranks(1, poisoned_steps, kind, tmp=tmp_path)
    weights = sorted(k[len("good1."):] for k in out if k.startswith("good1.w."))
    assert weights
    assert (out["good1.skipped"], out["good1.steps_done"]) == (0.0, 1.0)
    for bad in ("nan_grad", "inf_loss"):
        assert (out[f"{bad}.skipped"], out[f"{bad}.steps_done"]) == (1.0, 1.0), bad
        assert torch.equal(out[f"{bad}.moments"], out["good1.moments"]), bad
        assert all(torch.equal(out[f"{bad}.{w}"], out[f"good1.{w}"]) for w in weights), bad
    assert (out["good2.skipped"], out["good2.steps_done"]) == (0.0, 2.0)
    assert any(not torch.equal(out[f"good2.{w}"], out[f"good1.{w}"]) for w in weights)
