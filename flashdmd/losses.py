"""The losses of Flash-DMD, DMD2 and LPO as pure tensor functions (spec 1.5, 1.6, 1.8, 2.4, 3.4).

Each function takes already-computed predictions (no networks), so it can be checked against a
hand computation. Names follow the paper's symbols; the spec section is cited above each one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


# Spec 1.5 (paper Eq. 4; DMD2 main/sd_guidance.py): the DMD gradient with DMD2's normalisation
#   g = (p_real - p_fake) / mean_{C,H,W} |p_real|,  p = x - x0_hat(x_t, t)
def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Closed-form DMD gradient direction per element (no grad); fp32 at least."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, x0_real, x0_fake = x.detach().to(dtype), x0_real.detach().to(dtype), x0_fake.detach().to(dtype)
    p_real, p_fake = x - x0_real, x - x0_fake
    weight = _per_sample_mean(p_real.abs()).reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.nan_to_num((p_real - p_fake) / weight)


# Spec 1.5: L_DMD = 0.5 mean((x - sg(x - g))^2), whose autograd gradient w.r.t. x is g / numel(x).
def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Surrogate MSE whose gradient is the (normalised) DMD gradient; x carries the generator graph."""
    g = dmd_gradient(x, x0_real, x0_fake)
    target = (x.detach().to(g.dtype) - g)
    return 0.5 * F.mse_loss(x.to(g.dtype), target, reduction="mean")


# Spec 1.6 ([FD-pn] L_Diffusion): fake-score denoising loss in the schedule's native parameterisation.
def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.float(), target.float())


# Spec 1.8 (Algorithm 1 Hinge; ADM): L_D = E[relu(1 - D(x_real))] + E[relu(1 + D(x_fake))]
def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


# Spec 1.8: L_AdvGen = -E[D(V(G(x_hat, t_hat)))]  (hinge generator loss)
def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


# Spec 1.8 / 4.2 (DMD2 fallback, log form of the paper's L_AdvDisc^PG): softplus(D_f) + softplus(-D_r)
def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


# Spec 4.2: generator softplus(-D(x_fake))
def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    return F.softplus(-fake_logits).mean()


def d_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss by config name (stage1.gan_loss)."""
    if kind == "hinge":
        return hinge_d_loss(real_logits, fake_logits)
    if kind == "nonsaturating":
        return nonsaturating_d_loss(real_logits, fake_logits)
    raise ValueError(f"stage1.gan_loss must be 'hinge' or 'nonsaturating', got {kind!r}")


def g_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """Generator adversarial loss by config name (stage1.gan_loss)."""
    if kind == "hinge":
        return hinge_g_loss(fake_logits)
    if kind == "nonsaturating":
        return nonsaturating_g_loss(fake_logits)
    raise ValueError(f"stage1.gan_loss must be 'hinge' or 'nonsaturating', got {kind!r}")


# Spec 2.4: log p(z' | z_t) of the LCM transition N(alpha' x0, sigma'^2 I), MEAN over elements
# (LPO / DDPO convention, spec 3.4), so beta keeps LPO's scale.
def gaussian_logprob_mean(z: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample mean over elements of log N(z; mean, sigma^2); sigma broadcasts against z."""
    var = sigma.to(z.dtype) ** 2
    elem = -((z - mean) ** 2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)
    return _per_sample_mean(elem.expand_as(z))


# Spec 2.4 / 3.4 (paper Eq. 12-13, LPO train_lpo_sdxl.py):
#   r = clamp(p_theta / p_ref, 1 - eps, 1 + eps);  L_rl = -log sigmoid(beta (log r_w - log r_l))
def lpo_loss(logp_w: Tensor, logp_ref_w: Tensor, logp_l: Tensor, logp_ref_l: Tensor, beta: float,
             ratio_clip: float) -> Tensor:
    """Per-pair LPO loss (not reduced); clamping the ratio zeroes the gradient outside the trust region."""
    lo, hi = math.log(1.0 - ratio_clip), math.log(1.0 + ratio_clip)
    log_r_w = (logp_w - logp_ref_w).clamp(lo, hi)
    log_r_l = (logp_l - logp_ref_l).clamp(lo, hi)
    return -F.logsigmoid(beta * (log_r_w - log_r_l))
