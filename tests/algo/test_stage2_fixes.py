"""Stage 2 as spec 2.4-2.5 says: the fake score pulled every iteration, no optimizer step when no
rank kept a pair, the loss normalised by the global kept count, a log-ratio of exactly 0 at the
first step under a bf16 policy, and the stage-2 warm-up as configured."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine_world import run_ranks
from flashdmd.algo.optim import optim_specs
from flashdmd.config import load_config
from flashdmd.engine.local import LocalEngine
from stage2_world import fsdp_bf16_first_rl_loss, gmm_batch, stage2_setup


class CountingEngine(LocalEngine):
    """The real local engine, counting EMA pulls and generator optimizer steps."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.pulls: list[tuple[str, str]] = []
        self.steps: list[str] = []

    def ema_(self, target: str, source: str, decay: float) -> None:
        self.pulls.append((target, source))
        super().ema_(target, source, decay)

    def step(self, name: str) -> dict[str, float]:
        self.steps.append(name)
        return super().step(name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gmm-cache-stage2")


def test_the_fake_score_is_pulled_in_every_iteration_rl_ones_included(cache):
    engine = CountingEngine()
    cfg, parts, s2 = stage2_setup(engine, str(cache), ["stage2.rl_per_dm=5"])
    for step in range(6):  # 5 RL iterations, then the distillation one
        s2.step(step, gmm_batch(parts, seed=step))
        assert engine.pulls == [("fake_score", "generator")] * (step + 1), step
    assert engine.steps.count("generator") == 6 and engine.steps.count("fake_score") == 6


def test_rl_only_trains_the_generator_alone_and_pulls_nothing(cache):
    engine = CountingEngine()
    _, parts, s2 = stage2_setup(engine, str(cache), ["stage2.distill=false"])
    for step in range(3):
        s2.step(step, gmm_batch(parts, seed=step))
    assert engine.pulls == [] and engine.steps == ["generator"] * 3


def test_no_kept_pair_means_no_step_and_no_counted_update(cache):
    engine = CountingEngine()
    _, parts, s2 = stage2_setup(engine, str(cache), ["stage2.distill=false", "stage2.threshold=0.9999999"])
    before = {k: v.clone() for k, v in parts.generator.state_dict().items()}
    metrics = s2.step(0, gmm_batch(parts))
    assert metrics["rl_kept"] == 0.0 and metrics["rl_no_pairs"] == 1.0 and metrics["loss_rl"] == 0.0
    assert "generator_lr" not in metrics  # the trainer counts an update only where <net>_lr is reported
    assert engine.steps == [] and engine.optimizers["generator"].state == {}  # AdamW never ran
    assert engine.schedules["generator"].steps_done == 0
    assert all(torch.equal(before[k], v) for k, v in parts.generator.state_dict().items())
    assert all(p.grad is None for p in parts.generator.parameters())


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_pairs_on_every_rank_skip_together_and_one_empty_rank_still_steps(tmp_path, cache):
    from stage2_world import ddp_rl_step, local_rl_step

    nobody = run_ranks(2, ddp_rl_step, str(cache), [], tmp=tmp_path)
    assert nobody["m.rl_no_pairs"] == 1.0 and "m.generator_lr" not in nobody
    # rank 1 keeps no pair, rank 0 some: both step together; the loss is normalised by the global
    # count, so the averaged gradient equals that of one process holding rank 0's pairs alone
    # (normalising by each rank's own count would halve it)
    half = run_ranks(2, ddp_rl_step, str(cache), [0], tmp=tmp_path)
    alone = local_rl_step(str(cache))
    assert half["replicas_agree"] == 1.0 and half["m.rl_kept"] > 0
    assert half["m.rl_kept"] == pytest.approx(alone["m.rl_kept"] / 2)
    assert half["m.generator_grad_norm"] == pytest.approx(float(alone["m.generator_grad_norm"]), rel=1e-5)
    for k in alone:
        if k.startswith("g."):
            torch.testing.assert_close(half[k], alone[k])


@pytest.mark.distributed
def test_log_ratio_is_exactly_zero_at_the_first_step_under_a_bf16_policy(tmp_path, cache):
    ours = run_ranks(1, fsdp_bf16_first_rl_loss, str(cache), False, tmp=tmp_path)
    assert float(ours["loss_rl"]) == pytest.approx(math.log(2.0), abs=1e-6)  # -log sigmoid(beta * 0)
    fp32_reference = run_ranks(1, fsdp_bf16_first_rl_loss, str(cache), True, tmp=tmp_path)
    assert abs(float(fp32_reference["loss_rl"]) - math.log(2.0)) > 1e-3  # precision noise times beta = 500


def test_stage2_warmup_is_a_config_value_default_none():
    cfg = load_config("gmm2d", ["stage1.warmup_steps=500"])
    assert {s.warmup_steps for s in optim_specs(cfg, 1).values()} == {500}
    assert {s.warmup_steps for s in optim_specs(cfg, 2).values()} == {0}
    specs = optim_specs(load_config("gmm2d", ["stage2.warmup_steps=7", "stage2.iterations=50"]), 2)
    assert {(s.warmup_steps, s.total_steps) for s in specs.values()} == {(7, 50)}
    from flashdmd.engine.lr import lr_at

    assert lr_at(specs["generator"], 0) == pytest.approx(specs["generator"].lr / 7)
