"""Stage-1 and stage-2 iterations on the gmm2d parts: what moves, what stays, what is seeded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashdmd.algo.batch import Batch
from flashdmd.algo.optim import optim_specs
from flashdmd.algo.stage1 import Stage1
from flashdmd.algo.stage2 import Stage2, reference_copy
from flashdmd.config import load_config
from flashdmd.engine.local import LocalEngine
from flashdmd.nets.gmm2d import build_gmm_parts

SMALL = ["model.gmm.teacher_steps=30", "model.gmm.hidden=32", "data.batch_size=16"]


class RecordingEngine(LocalEngine):
    """The real local engine, recording EMA calls and which parameters collected gradients."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        self.ema_calls: list[tuple[str, str, float]] = []
        self.grads_seen: dict[str, set[str]] = {}

    def ema_(self, target, source, decay):
        self.ema_calls.append((target, source, decay))
        super().ema_(target, source, decay)

    def backward(self, name, loss):
        super().backward(name, loss)
        self.grads_seen[name] = {n for n in self.modules if any(p.grad is not None for p in self.modules[n].parameters())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gmm-cache")


def setup(cache: Path, overrides=(), stage: int = 1, rank: int = 0):
    cfg = load_config("gmm2d", SMALL + list(overrides))
    parts = build_gmm_parts(cfg, cache)
    eng = RecordingEngine(rank)
    frozen = parts.frozen()
    if stage == 2:
        frozen["reference"] = reference_copy(parts.generator, None)
    eng.setup(parts.trainable(), optim_specs(cfg, stage), frozen)
    return cfg, parts, eng


def batch(parts, n=16, seed=0) -> Batch:
    x, _ = parts.extras["gmm"].sample(n, torch.Generator().manual_seed(seed))
    return Batch({}, {}, parts.decoder(x), n)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_flash_iteration_updates_the_right_parameters(cache):
    cfg, parts, eng = setup(cache, ["stage1.ttur=1"])
    s1 = Stage1(cfg.stage1, parts, eng, seed=0)
    names = ("generator", "fake_score", "discriminator", "teacher", "decoder")
    before = {n: snapshot(eng.modules[n]) for n in names}
    metrics = s1.step(0, batch(parts))
    assert changed(before["generator"], parts.generator)
    assert changed(before["fake_score"], parts.fake_score)
    assert changed(before["discriminator"], parts.discriminator) == {
        k for k in before["discriminator"] if k.startswith("heads.")}  # frozen backbone untouched
    assert not changed(before["teacher"], parts.teacher) and not changed(before["decoder"], parts.decoder)
    # the generator loss reached only the generator: D was frozen for it, fake/teacher under no_grad
    assert eng.grads_seen["generator"] == {"generator"}
    assert eng.ema_calls == [("fake_score", "generator", cfg.stage1.fake_ema_decay)]
    assert all(isinstance(v, float) for v in metrics.values())
    # fake score == teacher and CFG 1 at the first iteration: the DMD gradient is exactly zero
    assert metrics["loss_dmd"] == 0.0 and "loss_gan_g" in metrics


def test_ttur_skips_the_generator_but_trains_the_critics(cache):
    cfg, parts, eng = setup(cache, ["stage1.ttur=2"])
    s1 = Stage1(cfg.stage1, parts, eng, seed=0)
    gen, fake = snapshot(parts.generator), snapshot(parts.fake_score)
    metrics = s1.step(1, batch(parts))
    assert not changed(gen, parts.generator) and changed(fake, parts.fake_score)
    assert "loss_dmd" not in metrics and "loss_d" in metrics and eng.ema_calls == []


@pytest.mark.parametrize("mode", ["dmd2", "dmd2_pixelgan"])
def test_dmd2_modes_use_one_output_and_pull_only_when_asked(cache, mode):
    cfg, parts, eng = setup(cache, [f"stage1.mode={mode}", "stage1.ttur=1", "stage1.dm_steps=[]",
                                    "stage1.gan_steps=[]", "stage1.fake_ema=false"])
    s1 = Stage1(cfg.stage1, parts, eng, seed=0)
    assert {s1.plan(i).gan_index for i in range(20)} == {None}
    assert {s1.plan(i).dm_index for i in range(40)} == {0, 1, 2, 3}  # every student step
    metrics = s1.step(0, batch(parts))
    assert eng.ema_calls == [] and {"loss_dmd", "loss_gan_g", "loss_fake", "loss_d"} <= set(metrics)
    # the config is what runs: fake_ema=true adds Flash-DMD's pull to the baseline (an ablation)
    cfg, parts, eng = setup(cache, [f"stage1.mode={mode}", "stage1.ttur=1", "stage1.dm_steps=[]", "stage1.gan_steps=[]"])
    Stage1(cfg.stage1, parts, eng, seed=0).step(0, batch(parts))
    assert eng.ema_calls == [("fake_score", "generator", cfg.stage1.fake_ema_decay)]


def test_plan_is_identical_across_ranks_and_noise_is_not(cache):
    cfg, parts0, eng0 = setup(cache, ["stage1.ttur=1"], rank=0)
    _, parts1, eng1 = setup(cache, ["stage1.ttur=1"], rank=1)
    s0, s1 = Stage1(cfg.stage1, parts0, eng0, seed=3), Stage1(cfg.stage1, parts1, eng1, seed=3)
    assert [s0.plan(i) for i in range(10)] == [s1.plan(i) for i in range(10)]
    assert {s0.plan(i).dm_index for i in range(40)} == {0, 1, 2} and {s0.plan(i).gan_index for i in range(9)} == {3}
    b = batch(parts0)
    s0.step(0, b)
    s1.step(0, b)
    assert changed(snapshot(parts0.generator), parts1.generator)  # different noise per rank


def test_same_seed_same_run_different_seed_different_run(cache):
    runs = []
    for seed in (5, 5, 6):
        cfg, parts, eng = setup(cache, ["stage1.ttur=1"])
        s1 = Stage1(cfg.stage1, parts, eng, seed=seed)
        for step in range(2):
            s1.step(step, batch(parts, seed=step))
        runs.append(snapshot(parts.generator))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_stage2_alternates_rl_and_distillation(cache):
    cfg, parts, eng = setup(cache, ["stage2.rl_per_dm=5"], stage=2)
    s2 = Stage2(cfg, parts, eng, 0, Stage1(cfg.stage1, parts, eng, 0))
    assert [s2.is_rl_iteration(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    ref = snapshot(eng["reference"])
    rl = s2.step(0, batch(parts))
    assert {"loss_rl", "rl_kept", "rl_reward_gap", "loss_fake", "loss_d"} <= set(rl) and "loss_dmd" not in rl
    assert rl["rl_reward_gap"] >= 0 and 0 < rl["rl_kept"] <= 1
    dm = s2.step(5, batch(parts))
    assert "loss_dmd" in dm and "loss_rl" not in dm
    assert not changed(ref, eng["reference"])


def test_rl_only_trains_the_generator_alone_and_prefers_the_winner(cache):
    cfg, parts, eng = setup(cache, ["stage2.distill=false", "stage2.beta=10.0"], stage=2)
    s2 = Stage2(cfg, parts, eng, 0, Stage1(cfg.stage1, parts, eng, 0))
    fake, disc, gen = snapshot(parts.fake_score), snapshot(parts.discriminator), snapshot(parts.generator)
    rollout = s2.sample_pairs(16, {}, torch.Generator().manual_seed(0))
    assert len(rollout.transitions) == len(cfg.stage2.rl_transitions)
    reward = eng["reward"]
    for tr in rollout.transitions:
        tt = torch.full((16,), tr.t_next)
        assert (reward(tr.win, tt, {}) >= reward(tr.lose, tt, {})).all()
    s2.step(0, batch(parts))
    assert changed(gen, parts.generator) and not changed(fake, parts.fake_score) and not changed(disc, parts.discriminator)


def test_stage2_needs_a_reference(cache):
    cfg, parts, eng = setup(cache)
    with pytest.raises(ValueError, match="reference"):
        Stage2(cfg, parts, eng, 0, Stage1(cfg.stage1, parts, eng, 0))


@pytest.mark.parametrize("fraction,share", [(1.0, 16), (0.25, 4), (0.01, 1)])
def test_the_gan_branch_runs_on_its_share_of_the_batch(cache, fraction, share):
    cfg, parts, eng = setup(cache, ["stage1.ttur=1", f"stage1.gan_batch_fraction={fraction}"])
    data = batch(parts)
    sizes: list[int] = []
    parts.discriminator.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    decoded: list[int] = []
    parts.decoder.register_forward_hook(lambda m, args, out: decoded.append(len(args[0])))
    Stage1(cfg.stage1, parts, eng, seed=0).step(0, data)
    assert decoded == [share]  # one decode of the GAN-branch outputs only
    assert sizes == [share, share, share]  # generator loss, then D on real and on fake
