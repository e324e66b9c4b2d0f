"""Which student steps get the DM loss and which the Pixel-GAN loss (spec 1.3, 6 #11).

Flash mode: explicit ``stage1.dm_steps`` / ``stage1.gan_steps`` win; a missing list is the
complement of the other; with both empty the rule is SNR(t) <= 1 -> DM, SNR(t) > 1 -> GAN [INF].
The rule reproduces the paper's SDXL 4-step split ({999, 749, 499} / {249}: SNR(499) = 0.38,
SNR(249) = 2.08) and gives SD3's sigma = 0.5 step (SNR exactly 1) to DM, as spec 1.3 suggests
("first three steps"). For the 8-step SDXL schedule the rule puts 374 (SNR 0.875) in DM; the
sdxl-8step preset lists {374, 249, 124} as GAN steps explicitly (spec 6 #11).
DMD2 modes (dmd2, dmd2_pixelgan): both losses on every step (the baseline, spec 4.2).
"""
from __future__ import annotations

import torch

from flashdmd.config import Stage1Config
from flashdmd.diffusion.schedules import Schedule


def split_steps(cfg: Stage1Config, schedule: Schedule) -> tuple[list[int], list[int]]:
    """(DM steps, GAN steps), each in schedule order (noisiest first)."""
    steps = list(cfg.student_timesteps)
    if cfg.mode != "flash":  # dmd2, dmd2_pixelgan: both losses on every step
        return steps, steps
    if cfg.dm_steps or cfg.gan_steps:
        dm = set(cfg.dm_steps) if cfg.dm_steps else set(steps) - set(cfg.gan_steps)
        gan = set(cfg.gan_steps) if cfg.gan_steps else set(steps) - set(cfg.dm_steps)
    else:
        snr = schedule.snr(torch.tensor(steps))
        dm = {t for t, r in zip(steps, snr.tolist()) if r <= 1.0}
        gan = set(steps) - dm
    if not dm:
        raise ValueError(f"stage1: no student step gets the DM loss (student_timesteps={steps}, "
                         f"dm_steps={cfg.dm_steps}, gan_steps={cfg.gan_steps}); list at least one in stage1.dm_steps")
    return [t for t in steps if t in dm], [t for t in steps if t in gan]
