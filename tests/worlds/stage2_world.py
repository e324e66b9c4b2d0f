"""Stage-2 runs on the gmm2d parts for the stage-2 tests: an engine of any kind with the frozen
reference and reward registered, and rank functions for ``engine_world.run_ranks``.

``RankReward`` is the toy reward on some ranks and a constant on the others: a constant scores
all K candidates alike, so softmax(s_w, s_l) is (0.5, 0.5) and no pair passes any threshold;
that is how a test makes one rank keep no pair while another keeps some.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flashdmd.algo.batch import Batch
from flashdmd.algo.optim import optim_specs
from flashdmd.algo.stage1 import Stage1
from flashdmd.algo.stage2 import Stage2, reference_copy
from flashdmd.config import Config, load_config
from flashdmd.engine.base import Engine
from flashdmd.nets.gmm2d import build_gmm_parts
from flashdmd.nets.parts import Parts

# the mlp teacher (the preset's default, named here because these tests need it): its students
# carry bf16 rounding from the first step (the exact teacher's start with a zero correction,
# identical in any precision)
SMALL = ["model.gmm.teacher=mlp", "model.gmm.teacher_steps=30", "model.gmm.hidden=32", "data.batch_size=16",
         "stage2.beta=10.0"]


class RankReward(nn.Module):
    """The family's reward times ``scale`` on the ranks in ``active``, 0 on the others."""

    def __init__(self, reward: nn.Module, active: set[int], scale: float = 1.0) -> None:
        super().__init__()
        self.reward, self.active, self.scale = reward, active, scale

    def forward(self, latents: Tensor, t: Tensor, cond: Any) -> Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        score = self.reward(latents, t, cond)
        return score * self.scale if rank in self.active else torch.zeros_like(score)


def stage2_setup(engine: Engine, cache: str, overrides: list[str] = (), reward: nn.Module | None = None,
                 reference_dtype: torch.dtype | None = None) -> tuple[Config, Parts, Stage2]:
    """gmm2d parts in ``engine`` with the reference in ``reference_dtype`` (default: the engine's compute dtype)."""
    cfg = load_config("gmm2d", SMALL + list(overrides))
    parts = build_gmm_parts(cfg, Path(cache))
    frozen = parts.frozen()
    if reward is not None:
        frozen["reward"] = reward
    frozen["reference"] = reference_copy(parts.generator, reference_dtype or engine.compute_dtype)
    engine.setup(parts.trainable(), optim_specs(cfg, 2), frozen)
    stage1 = Stage1(cfg.stage1, parts, engine, cfg.seed)
    return cfg, parts, Stage2(cfg, parts, engine, cfg.seed, stage1)


def gmm_batch(parts: Parts, n: int = 16, seed: int = 0) -> Batch:
    x, _ = parts.extras["gmm"].sample(n, torch.Generator().manual_seed(seed))
    return Batch({}, {}, parts.decoder(x), n)


def _tensors(metrics: dict[str, float], parts: Parts) -> dict[str, Tensor]:
    out = {f"m.{k}": torch.tensor(v) for k, v in metrics.items()}
    out.update({f"g.{k}": v.detach().clone() for k, v in parts.generator.state_dict().items()})
    return out


def ddp_rl_step(cache: str, active: list[int]) -> dict[str, Tensor]:
    """One RL update under DDP where only the ranks in ``active`` can keep pairs; rank 0's
    metrics and generator weights, plus whether the generator replicas still agree."""
    from flashdmd.engine.ddp import DDPEngine

    engine = DDPEngine("cpu")
    probe = build_gmm_parts(load_config("gmm2d", SMALL), Path(cache))
    reward = RankReward(probe.reward, set(active), scale=100.0)
    _, parts, s2 = stage2_setup(engine, cache, ["stage2.distill=false"], reward=reward)
    metrics = s2.step(0, gmm_batch(parts))
    flat = torch.cat([p.detach().flatten() for p in parts.generator.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(engine.world_size)]
    dist.all_gather(gathered, flat)
    out = _tensors(metrics, parts)
    out["replicas_agree"] = torch.tensor(float(all(torch.equal(gathered[0], g) for g in gathered)))
    return out


def local_rl_step(cache: str) -> dict[str, Tensor]:
    """The same RL update on one process with rank 0's data (the reference for ``ddp_rl_step``)."""
    from flashdmd.engine.local import LocalEngine

    engine = LocalEngine("cpu")
    probe = build_gmm_parts(load_config("gmm2d", SMALL), Path(cache))
    _, parts, s2 = stage2_setup(engine, cache, ["stage2.distill=false"], reward=RankReward(probe.reward, {0}, 100.0))
    return _tensors(s2.step(0, gmm_batch(parts)), parts)


def fsdp_bf16_first_rl_loss(cache: str, reference_in_fp32: bool) -> dict[str, Tensor]:
    """The first RL loss under FSDP2 with a real bf16 mixed-precision policy (param_dtype bf16,
    fp32 masters), the reference as ``reference_copy`` makes it or kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from flashdmd.engine.fsdp import FSDPEngine

    engine = FSDPEngine(precision="bf16")
    # the engine keeps CPU compute in fp32; this test wants the GPU policy's bf16 forward on CPU
    engine.mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    engine.compute_dtype = torch.bfloat16
    _, parts, s2 = stage2_setup(engine, cache, ["stage2.distill=false", "stage2.threshold=0.0", "stage2.beta=500.0"],
                                reference_dtype=torch.float32 if reference_in_fp32 else None)
    metrics = s2.rl_update(0, gmm_batch(parts))
    return {"loss_rl": torch.tensor(metrics["loss_rl"], dtype=torch.float64)}
