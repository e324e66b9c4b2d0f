"""Each loss against a hand computation or an independent formula."""
from __future__ import annotations

import math

import pytest
import torch

from flashdmd.losses import (
    d_loss,
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    g_loss,
    gaussian_logprob_mean,
    hinge_d_loss,
    hinge_g_loss,
    lpo_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)


def test_dmd_surrogate_gradient_is_the_closed_form_dmd_gradient():
    x, x0_real, x0_fake = _inputs()
    x.requires_grad_(True)
    dmd_loss(x, x0_real, x0_fake).backward()
    # closed form (spec 1.5): (p_real - p_fake) / mean|p_real| per sample, divided by the element count
    p_real, p_fake = x.detach() - x0_real, x.detach() - x0_fake
    weight = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (p_real - p_fake) / weight / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-12)
    assert torch.allclose(dmd_gradient(x, x0_real, x0_fake), (x0_fake - x0_real) / weight)


def test_dmd_gradient_descends_along_real_minus_fake_scores():
    # score s = -(x_t - alpha x0)/sigma^2, so s_real - s_fake is proportional to x0_real - x0_fake;
    # the DMD update x <- x - lr grad must move x towards x0_real and away from x0_fake
    x, x0_real, x0_fake = _inputs(1)
    step = -dmd_gradient(x, x0_real, x0_fake)
    assert (step * (x0_real - x0_fake)).sum() > 0


def test_dmd_gradient_vanishes_when_scores_agree():
    x, x0_real, _ = _inputs(2)
    x.requires_grad_(True)
    loss = dmd_loss(x, x0_real, x0_real.clone())
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0


def test_dmd_gradient_is_finite_when_x_equals_the_real_prediction():
    x, _, x0_fake = _inputs(3)
    assert torch.isfinite(dmd_gradient(x, x.clone(), x0_fake)).all()


def test_dmd_loss_keeps_low_precision_inputs_in_fp32():
    x, x0_real, x0_fake = (v.to(torch.bfloat16) for v in _inputs(4))
    assert dmd_loss(x.requires_grad_(True), x0_real, x0_fake).dtype == torch.float32


def test_denoising_loss_is_mse():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert denoising_loss(pred, target).item() == pytest.approx((1 + 0 + 1 + 4) / 4)


def test_hinge_and_nonsaturating_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.7])
    # relu(1 - r): 0, 0.5, 2 -> mean 5/6; relu(1 + f): 0, 1, 1.7 -> mean 0.9
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 0.9)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 0.7) / 3)
    sp = lambda v: math.log1p(math.exp(v))
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(
        (sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(0.7)) / 3)
    assert nonsaturating_g_loss(fake).item() == pytest.approx((sp(2.0) + sp(0.0) + sp(-0.7)) / 3)
    assert d_loss("hinge", real, fake) == hinge_d_loss(real, fake)
    assert g_loss("nonsaturating", fake) == nonsaturating_g_loss(fake)
    with pytest.raises(ValueError, match="stage1.gan_loss"):
        g_loss("wasserstein", fake)


def test_gaussian_logprob_mean_matches_torch_distributions():
    z, mean = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1]).reshape(4, 1, 1, 1)
    expected = torch.distributions.Normal(mean, sigma.expand_as(mean)).log_prob(z).flatten(1).mean(1)
    assert torch.allclose(gaussian_logprob_mean(z, mean, sigma), expected, atol=1e-6)


def test_lpo_loss_by_hand():
    # pair 1: log-ratios inside the trust region; pair 2: the winner's ratio clipped at log(1.1)
    lp_w, lp_ref_w = torch.tensor([-1.00, -1.0]), torch.tensor([-1.02, -1.5])
    lp_l, lp_ref_l = torch.tensor([-2.00, -2.0]), torch.tensor([-1.97, -2.0])
    beta = 50.0
    got = lpo_loss(lp_w, lp_ref_w, lp_l, lp_ref_l, beta=beta, ratio_clip=0.1)
    h1 = 0.02 - (-0.03)
    h2 = math.log(1.1) - 0.0
    expected = [-math.log(1 / (1 + math.exp(-beta * h1))), -math.log(1 / (1 + math.exp(-beta * h2)))]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_lpo_clipping_zeroes_the_gradient_outside_the_trust_region():
    lp_w = torch.tensor([0.5, 0.01], requires_grad=True)  # ratio e^0.5 > 1.1 is clipped; e^0.01 is not
    loss = lpo_loss(lp_w, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=10.0, ratio_clip=0.1).sum()
    loss.backward()
    assert lp_w.grad[0].item() == 0.0 and lp_w.grad[1].item() < 0.0  # raising the winner's likelihood helps
    at_ref = lpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=500.0, ratio_clip=0.1)
    assert at_ref.item() == pytest.approx(math.log(2.0))
