"""The one place that turns the config into per-network optimizer settings (``OptimSpec``).

Stage 1 (spec 1.6 [INF]: DMD2's optimiser): AdamW per trainable network at its own rate; the
generator's schedule spans ``iterations // ttur`` updates, the critics' every iteration.
Stage 2 (spec 2.5): the same optimizers restarted, the generator at ``stage2.rl_lr`` (0 -> stage
1's rate) for both its RL and its distillation updates (they share one optimizer), every schedule
spanning ``stage2.iterations``, and the warm-up ``stage2.warmup_steps`` (default none: the spec
asks for no second warm-up, and stage 1's 500 would hold a quarter of the 2,000 joint iterations
at a reduced rate).
"""
from __future__ import annotations

from flashdmd.config import Config
from flashdmd.engine.base import OptimSpec

TRAINABLE = ("generator", "fake_score", "discriminator")


def optim_specs(cfg: Config, stage: int = 1) -> dict[str, OptimSpec]:
    """AdamW settings of the three trainable networks for ``stage`` (1 or 2)."""
    if stage not in (1, 2):
        raise ValueError(f"optim_specs: stage must be 1 or 2, got {stage!r}")
    s1 = cfg.stage1
    common = {"betas": (s1.adam_betas[0], s1.adam_betas[1]), "weight_decay": s1.weight_decay,
              "schedule": s1.lr_schedule, "grad_clip": s1.grad_clip}
    if stage == 1:
        common["warmup_steps"] = s1.warmup_steps
        totals = {"generator": max(1, s1.iterations // s1.ttur), "fake_score": s1.iterations,
                  "discriminator": s1.iterations}
        rates = {"generator": s1.generator_lr}
    else:
        common["warmup_steps"] = cfg.stage2.warmup_steps
        totals = dict.fromkeys(TRAINABLE, cfg.stage2.iterations)
        rates = {"generator": cfg.stage2.rl_lr or s1.generator_lr}
    rates.update(fake_score=s1.fake_lr, discriminator=s1.disc_lr)
    return {name: OptimSpec(lr=rates[name], total_steps=totals[name], **common) for name in TRAINABLE}
