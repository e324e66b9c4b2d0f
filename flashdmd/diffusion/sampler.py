"""Teacher multi-step sampler with classifier-free guidance: DDIM (eta = 0) for VP, Euler for flow.

One update serves both kinds: ``x_next = alpha_next x0_hat + sigma_next eps_hat`` is DDIM for VP
and, with alpha = 1 - s, sigma = s, exactly the Euler step ``x + (s_next - s) v`` of a rectified
flow. The last step returns x0_hat. CFG follows DMD2/diffusers: ``u + w (c - u)`` on the native
prediction, which is linear in x0 and epsilon, so guiding the prediction guides both.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flashdmd.diffusion.schedules import Schedule
from flashdmd.nets.interfaces import Conditioning, cat_cond


def cfg_predict(model: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning,
                scale: float) -> Tensor:
    """Native prediction with classifier-free guidance; scale 1 runs the conditional branch only."""
    if scale == 1.0:
        return model(x_t, t, cond)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
    pred_u, pred_c = both.chunk(2)
    return pred_u + scale * (pred_c - pred_u)


@torch.no_grad()
def sample_teacher(model: nn.Module, schedule: Schedule, z: Tensor, num_steps: int, cond: Conditioning,
                   uncond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
    """Deterministic multi-step sampling from noise ``z``; returns x0."""
    grid = schedule.sampling_timesteps(num_steps).to(z.device)
    x = z
    x0 = z
    for i in range(num_steps):
        t = grid[i].expand(z.shape[0])
        pred = cfg_predict(model, x, t, cond, uncond, guidance_scale)
        x0 = schedule.to_x0(pred, x, t)
        if i + 1 < num_steps:
            eps = schedule.to_eps(pred, x, t)
            a, s = schedule.alpha_sigma(grid[i + 1].expand(z.shape[0]), x)
            x = a * x0 + s * eps
    return x0
