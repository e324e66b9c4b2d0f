"""A global batch the world size does not divide (spec 1.9, flashdmd/algo/shares.py): the share
arithmetic, the config's error, and the invariant that makes the split exact: 2 gloo ranks with
shares 2 and 1 (toy world) or 3 and 2 (real stage 1 on tiny-sdxl) give the gradients of the mean
over the whole global batch, as one process computes it, for DDP, FSDP2 and ZeRO-3. Plain
per-rank means (no weights) miss it, which the controls below show."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_world import run_ranks
from uneven_world import NETS, PROMPTS, stage1_grads, stage1_grads_run, toy_run

from flashdmd.algo.shares import mean_weight, split_batch
from flashdmd.algo.stage1 import gan_share
from flashdmd.config import ConfigError, load_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.getbasetemp() / "nets-cache")  # the session's, shared with tests/nets/test_nets_*


def test_split_gives_the_first_ranks_one_more_and_sums_to_the_batch():
    assert split_batch(48, 32) == [2] * 16 + [1] * 16
    assert split_batch(64, 32) == [2] * 32
    assert split_batch(7, 3) == [3, 2, 2]
    assert split_batch(5, 5) == [1] * 5
    for total in range(1, 40):
        for world in range(1, total + 1):
            shares = split_batch(total, world)
            assert sum(shares) == total and max(shares) - min(shares) <= 1 and min(shares) >= 1
            assert shares == sorted(shares, reverse=True)
    with pytest.raises(ValueError, match="without a sample"):
        split_batch(3, 4)


def test_weights_turn_the_rank_average_into_the_global_mean():
    shares = [3, 2, 2]
    weights = [mean_weight(shares, r) for r in range(3)]
    assert weights == pytest.approx([9 / 7, 6 / 7, 6 / 7])
    # rank means of per-sample values; the ranks' average of the weighted means is the global mean
    values = torch.arange(7, dtype=torch.float64) ** 2
    means = [values[:3].mean(), values[3:5].mean(), values[5:].mean()]
    assert float(sum(w * m for w, m in zip(weights, means)) / 3) == pytest.approx(float(values.mean()))
    assert [mean_weight([2, 2], r) for r in range(2)] == [1.0, 1.0]
    with pytest.raises(ValueError):
        mean_weight([2, 1], 2)


def test_the_config_splits_unevenly_and_refuses_fewer_samples_than_ranks():
    cfg = load_config("tiny-sdxl", ["data.global_batch_size=48"])
    assert cfg.data.shares(32) == [2] * 16 + [1] * 16
    assert [cfg.data.per_rank(32, r) for r in (0, 15, 16, 31)] == [2, 2, 1, 1]
    assert cfg.data.shares(8) == [6] * 8
    plain = load_config("tiny-sdxl", ["data.batch_size=5"])
    assert plain.data.shares(3) == [5, 5, 5] and plain.data.per_rank(3, 2) == 5
    with pytest.raises(ConfigError, match=r"data.global_batch_size=48 .*world size 64"):
        cfg.data.shares(64)


def test_the_stage1_weights_count_every_ranks_gan_subset(cache: str):
    """Stage1.loss_weights on shares 3 and 2 with half the batch on the GAN branch: batch terms
    n W / N, GAN terms m W / M with m = ceil(n / 2) on every rank (2 and 1, M = 3)."""
    from uneven_world import rank_batch, stage1_config

    from flashdmd.algo.optim import optim_specs
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.engine.local import LocalEngine
    from flashdmd.nets.registry import build_parts

    cfg = stage1_config(cache, "flash")
    parts = build_parts(cfg, Path(cache))
    for rank, expected in ((0, (6 / 5, 4 / 3)), (1, (4 / 5, 2 / 3))):
        engine = LocalEngine("cpu")
        engine.rank, engine.world_size = rank, 2
        engine.setup(parts.trainable(), optim_specs(cfg, 1), parts.frozen())
        stage1, batch = Stage1(cfg.stage1, parts, engine, cfg.seed), rank_batch(parts, rank, [3, 2], True)
        weights = stage1.loss_weights(batch)
        assert (weights.batch, weights.gan) == pytest.approx(expected)
        with pytest.raises(ValueError, match="do not describe rank"):  # shares of another split
            stage1.loss_weights(dataclasses.replace(batch, shares=(2, 3)))


@pytest.mark.distributed
@pytest.mark.slow
def test_toy_world_two_uneven_ranks_match_one_process(tmp_path: Path):
    """Global batch 3 on 2 ranks (2 + 1): DDP, FSDP2 and ZeRO-3 end one iteration with the weights
    and gradient norms of one process holding all 3 samples (tolerances as in test_engine_sharded)."""
    reference = run_ranks(1, toy_run, "local", tmp=tmp_path)
    for kind in ("ddp", "fsdp", "deepspeed"):
        got = run_ranks(2, toy_run, kind, tmp=tmp_path)
        assert got.keys() == reference.keys()
        worst = max(((got[k] - reference[k]).abs().max().item(), k) for k in reference)
        assert worst[0] <= 1e-5, f"{kind}: {worst}"
    plain = run_ranks(2, toy_run, "ddp", False, tmp=tmp_path)  # per-rank means, no weights
    assert any(abs(float(plain[f"norm.{n}"] - reference[f"norm.{n}"])) > 1e-3 * float(reference[f"norm.{n}"])
               for n in NETS)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["flash", "dmd2"])
def test_real_stage1_on_uneven_ranks_averages_to_the_global_mean(mode: str, cache: str, tmp_path: Path):
    """tiny-sdxl, 5 prompts on 2 DDP ranks (3 + 2): every network's averaged gradient equals
    sum_r (c_r / C) g_r, with g_r rank r's plain local-mean gradient (recomputed here in one
    process with rank r's noise) and c_r the samples its loss averages over: the batch for the
    generator and fake score, the GAN subset (2 + 1) for flash mode's discriminator."""
    from uneven_world import stage1_config

    from flashdmd.engine.local import LocalEngine
    from flashdmd.nets.registry import build_parts

    build_parts(stage1_config(cache, mode), Path(cache))  # built once, before the ranks read it
    got = run_ranks(2, stage1_grads_run, cache, mode, tmp=tmp_path)
    shares = split_batch(len(PROMPTS), 2)
    local = []
    for rank in range(2):
        engine = LocalEngine("cpu")
        engine.rank, engine.world_size = rank, 2
        local.append(stage1_grads(cache, mode, engine, rank, shares, weighted=False))
    assert set(got) == set(NETS)
    for name in NETS:
        counts = [gan_share(0.5, n) for n in shares] if (mode, name) == ("flash", "discriminator") else shares
        expected = sum(c / sum(counts) * g[name] for c, g in zip(counts, local))
        plain = sum(g[name] for g in local) / 2
        scale = expected.abs().max().item()
        assert (got[name] - expected).abs().max().item() <= 1e-5 * scale, name
        assert (plain - expected).abs().max().item() > 1e-3 * scale, name  # the weights matter here


def test_each_rank_draws_its_share_and_every_batch_carries_the_split(tmp_path: Path):
    """The data layer (flashdmd/train/batches.py) on the toy world: 3 over 2 ranks gives 2 and 1
    samples, with the shares attached; an even split attaches none (no reweighting)."""
    from flashdmd.nets.gmm2d import build_gmm_parts
    from flashdmd.train.batches import build_batches

    small = ["model.gmm.teacher_steps=30", "model.gmm.hidden=32"]
    parts = build_gmm_parts(load_config("gmm2d", small), tmp_path)
    uneven = load_config("gmm2d", [*small, "data.global_batch_size=3"])
    got = [build_batches(uneven, parts, r, 2, torch.device("cpu")).next_batch(0) for r in range(2)]
    assert [(b.size, len(b.real), b.shares) for b in got] == [(2, 2, (2, 1)), (1, 1, (2, 1))]
    even = build_batches(load_config("gmm2d", [*small, "data.global_batch_size=4"]), parts, 1, 2,
                         torch.device("cpu")).next_batch(0)
    assert (even.size, even.shares) == (2, ())
