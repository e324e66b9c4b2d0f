"""Runs for tests/algo/test_uneven_batch.py: a global batch that the world size does not divide
(spec 1.9), split by ``flashdmd.algo.shares`` and weighted so the ranks' averaged gradients are the
mean over the whole global batch.

- ``toy_run``: the engine world's networks (tests/worlds/engine_world.py) and a Flash-DMD-shaped
  iteration whose randomness is drawn for the global batch, so one process with the whole batch
  is the reference for any world size and engine.
- ``stage1_grads_run``: the real stage-1 algorithm on tiny-sdxl; each rank's gradients (averaged by
  the engine) are captured where the optimizer would step, and nothing steps, so a single process
  can reproduce every rank's local gradients for the reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from engine_world import flatten, full_weights, make_engine, setup_engine
from torch import Tensor

from flashdmd.algo.shares import mean_weight, split_batch
from flashdmd.engine.base import Engine

DIM, TOY_BATCH = 8, 3


def toy_batch() -> dict[str, Tensor]:
    """The global batch of the toy iteration, identical in every process."""
    g = torch.Generator().manual_seed(77)
    return {"z": torch.randn(TOY_BATCH, DIM, generator=g), "noise": torch.randn(TOY_BATCH, DIM, generator=g),
            "t": torch.randint(20, 980, (TOY_BATCH,), generator=g).float(),
            "real": torch.randn(TOY_BATCH, DIM, generator=g) + 1.0}


def toy_iteration(engine: Engine, weighted: bool = True) -> dict[str, float]:
    """One generator / fake-score / discriminator step on this rank's share of ``toy_batch``; the
    losses are per-sample means scaled by ``mean_weight`` (``weighted=False``: plain means)."""
    shares = split_batch(TOY_BATCH, engine.world_size)
    start = sum(shares[:engine.rank])
    b = {k: v[start:start + shares[engine.rank]] for k, v in toy_batch().items()}
    w = mean_weight(shares, engine.rank) if weighted else 1.0
    t999 = torch.full((len(b["z"]),), 999.0)
    a = (1 - b["t"] / 1000.0)[:, None]
    x0 = engine["generator"](b["z"], t999, {})
    with torch.no_grad():
        x_t = a * x0 + (1 - a) * b["noise"]
        target = x0 - 0.1 * (engine["teacher"](x_t, b["t"], {}) - engine["fake_score"](x_t, b["t"], {}))
    with engine.frozen("discriminator"):
        gan = -engine["discriminator"](engine["decoder"](x0)).mean()
    engine.backward("generator", w * (F.mse_loss(x0, target) + 0.5 * gan))
    stats = {"generator": engine.step("generator")["grad_norm"]}
    engine.ema_("fake_score", "generator", 0.9)
    x0 = x0.detach()
    x_t = a * x0 + (1 - a) * b["noise"]
    engine.backward("fake_score", w * F.mse_loss(engine["fake_score"](x_t, b["t"], {}), x0))
    stats["fake_score"] = engine.step("fake_score")["grad_norm"]
    d = engine["discriminator"]
    d_loss = F.relu(1 - d(b["real"])).mean() + F.relu(1 + d(engine["decoder"](x0))).mean()
    engine.backward("discriminator", w * d_loss)
    stats["discriminator"] = engine.step("discriminator")["grad_norm"]
    return stats


def toy_run(kind: str, weighted: bool = True) -> dict[str, Tensor]:
    """One toy iteration under ``kind``; the full weights after it and each network's gradient norm."""
    engine = setup_engine(make_engine(kind))
    norms = toy_iteration(engine, weighted)
    out = flatten(full_weights(engine), prefix="w.")
    out.update({f"norm.{k}": torch.tensor(v, dtype=torch.float64) for k, v in norms.items()})
    return out


# ------------------------------------------------------------------ tiny-sdxl, the real stage 1
PROMPTS = ["a red car", "a cat on a mat", "a bowl of fruit", "a blue house", "two dogs on a beach"]
NETS = ("generator", "fake_score", "discriminator")


def stage1_config(cache: str, mode: str) -> Any:
    """tiny-sdxl without LoRA, no EMA pull (the weights must not move during the turns), TTUR 1;
    flash mode without the GAN term in the generator loss, so each network's loss is a mean over
    one kind of sample: the generator and fake score over the batch, the discriminator over the
    GAN branch's subset (half the batch, rounded up)."""
    from flashdmd.config import load_config

    modes = {"flash": ["stage1.gan_weight=0.0", "stage1.gan_batch_fraction=0.5"],
             "dmd2": ["stage1.mode=dmd2", "stage1.dm_steps=[]", "stage1.gan_steps=[]",
                      "stage1.gan_loss=nonsaturating"]}
    return load_config("tiny-sdxl", ["engine.kind=local", f"model.cache_dir={cache}", "model.lora.enabled=false",
                                     "stage1.fake_ema=false", "stage1.ttur=1", *modes[mode]])


def rank_batch(parts: Any, rank: int, shares: list[int], weighted: bool) -> Any:
    """Rank ``rank``'s slice of a fixed global batch of prompts and real pixels."""
    from flashdmd.algo.batch import Batch

    start, n = sum(shares[:rank]), shares[rank]
    real = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        cond, uncond = parts.encode_prompts(PROMPTS[start:start + n]), parts.null_cond(n)
    return Batch(cond=cond, uncond=uncond, real=real[start:start + n], size=n,
                 shares=tuple(shares) if weighted else ())


def capture_grads(engine: Engine) -> dict[str, Tensor]:
    """Replace ``engine.step``: keep each network's (averaged) gradients, step nothing."""
    grads: dict[str, Tensor] = {}

    def step(name: str) -> dict[str, float]:
        params = [p for p in engine[name].parameters() if p.requires_grad]
        grads[name] = torch.cat([p.grad.detach().reshape(-1).double() for p in params])
        engine.zero_grad(name)
        return {"grad_norm": float(grads[name].norm()), "lr": 0.0}

    engine.step = step  # type: ignore[method-assign]
    return grads


def stage1_grads(cache: str, mode: str, engine: Engine, rank: int, shares: list[int], weighted: bool) -> dict[str, Tensor]:
    """One stage-1 iteration of ``rank``'s batch on ``engine``; the gradients each network would step with."""
    from flashdmd.algo.optim import optim_specs
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.nets.registry import build_parts

    cfg = stage1_config(cache, mode)
    torch.manual_seed(0)  # identical discriminator heads in every process
    parts = build_parts(cfg, Path(cache))
    engine.setup(parts.trainable(), optim_specs(cfg, 1), parts.frozen())
    grads = capture_grads(engine)
    batch = rank_batch(parts, rank, shares, weighted)
    torch.manual_seed(100 + rank)  # the VAE encoder (dmd2 mode) samples from the global generator
    Stage1(cfg.stage1, parts, engine, cfg.seed).step(0, batch)
    return grads


def stage1_grads_run(cache: str, mode: str) -> dict[str, Tensor]:
    """Spawned on every rank: the DDP-averaged gradients of one weighted iteration (rank 0's copy)."""
    from flashdmd.engine.ddp import DDPEngine

    engine = DDPEngine()
    shares = split_batch(len(PROMPTS), engine.world_size)
    return stage1_grads(cache, mode, engine, engine.rank, shares, weighted=True)
