"""Schedules, conversions, rollout and teacher sampler against independent computations."""
from __future__ import annotations

import math

import pytest
import torch

from flashdmd.diffusion.rollout import backward_simulate, continue_from, sample_student
from flashdmd.diffusion.sampler import cfg_predict, sample_teacher
from flashdmd.diffusion.schedules import FlowSchedule, VPSchedule

SCHEDULES = {
    "vp-eps": VPSchedule(prediction="epsilon"),
    "vp-v": VPSchedule(prediction="v_prediction"),
    "vp-linear-eps": VPSchedule("linear", 1e-4, 0.02),
    "flow": FlowSchedule(shift=3.0),
}


def test_sdxl_schedule_matches_spec_table():
    # spec notation table (computed from the SDXL schedule): abar and SNR at the student steps
    vp = VPSchedule()
    t = torch.tensor([999, 749, 499, 249, 124])
    a, s = vp.alpha_sigma(t)
    assert torch.allclose(a**2, torch.tensor([0.00466, 0.05662, 0.27767, 0.67543, 0.86341]), atol=5e-5)
    assert torch.allclose(vp.snr(t).float(), torch.tensor([0.0047, 0.0600, 0.384, 2.08, 6.32]), rtol=5e-3)
    assert torch.allclose(a**2 + s**2, torch.ones(5))


def test_vp_betas_match_diffusers():
    from diffusers import DDPMScheduler

    for kind, b0, b1 in (("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)):
        ref = DDPMScheduler(beta_schedule=kind, beta_start=b0, beta_end=b1).alphas_cumprod.double()
        assert torch.allclose(VPSchedule(kind, b0, b1).alphas_cumprod, ref, rtol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t_kind", ["long", "float"])
def test_conversions_round_trip(name, t_kind):
    sch = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([20, 100, 300, 500, 800, 980])
    t = t if t_kind == "long" else t.double() + 0.37
    x_t = sch.add_noise(x0, eps, t)
    pred = sch.target(x0, eps, t)  # the exact native prediction
    assert torch.allclose(sch.to_x0(pred, x_t, t), x0, atol=1e-9)
    assert torch.allclose(sch.to_eps(pred, x_t, t), eps, atol=1e-9)
    assert torch.allclose(sch.from_x0(x0, x_t, t), pred, atol=1e-9)
    _, s = sch.alpha_sigma(t, x0)
    assert torch.allclose(sch.score(pred, x_t, t), -eps / s, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_score_of_exact_denoiser_is_the_gaussian_score(name):
    # data N(mu, c^2 I) -> p_t = N(alpha mu, (alpha^2 c^2 + sigma^2) I): a score known in closed form
    sch = SCHEDULES[name]
    mu, c = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.7
    x_t = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([50, 250, 500, 750, 950])
    a, s = sch.alpha_sigma(t, x_t)
    var = a**2 * c**2 + s**2
    x0_post = mu + a * c**2 / var * (x_t - a * mu)  # posterior mean E[x0 | x_t]
    pred = sch.from_x0(x0_post, x_t, t)
    assert torch.allclose(sch.score(pred, x_t, t), -(x_t - a * mu) / var, atol=1e-9)


def test_v_prediction_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    x0, eps, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([10, 500, 990])
    sch = VPSchedule(prediction="v_prediction")
    assert torch.allclose(sch.target(x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-5)
    assert torch.allclose(sch.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5)


def test_flow_shift_and_samplers():
    fl = FlowSchedule(shift=3.0)
    assert torch.allclose(fl.shift_sigma(torch.tensor([1.0, 0.75, 0.5, 0.25])).float(),
                          torch.tensor([1.0, 0.9, 0.75, 0.5]))  # spec 1.2 option (b)
    assert fl.snr(torch.tensor([500.0])).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    t = fl.sample_t_logit_normal(20000, generator=g)
    assert t.min() > 0 and t.max() < 1000
    # with shift 3 the median sigma is shift(0.5) = 0.75
    assert t.median().item() == pytest.approx(750, abs=15)
    u = fl.sample_t(10000, 0.2, 0.4, g)
    assert u.is_floating_point() and u.min() >= 200 and u.max() <= 400
    v = VPSchedule().sample_t(10000, 0.02, 0.98, g)
    assert v.dtype == torch.long and v.min() == 20 and v.max() == 980
    with pytest.raises(ValueError, match="lo < hi"):
        fl.sample_t(3, 0.5, 0.5)


def test_vp_float_timesteps_interpolate_abar():
    vp = VPSchedule()
    a_lo, _ = vp.alpha_sigma(torch.tensor([400]))
    a_hi, _ = vp.alpha_sigma(torch.tensor([401]))
    a_mid, _ = vp.alpha_sigma(torch.tensor([400.25]))
    assert torch.allclose(a_mid**2, 0.75 * a_lo**2 + 0.25 * a_hi**2)


class _Affine(torch.nn.Module):
    """A fixed 'generator': native prediction = W x + t/1000 (any deterministic function works)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.5]]))

    def forward(self, x, t, cond):
        return x @ self.w.T + (t.float() / 1000).unsqueeze(1) + cond.get("shift", 0.0)


@pytest.mark.parametrize("name", ["vp-eps", "flow"])
def test_rollout_equals_hand_unrolled(name):
    sch, model = SCHEDULES[name], _Affine()
    steps = [999, 749, 499, 249]
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))

    def x0_of(x, t):
        tt = torch.full((4,), t)
        return sch.to_x0(model(x, tt, {}), x, tt)

    def renoise(x0, t, g):
        a, s = sch.alpha_sigma(torch.full((4,), t), x0)
        return a * x0 + s * torch.randn(4, 2, generator=g)

    g_hand = torch.Generator().manual_seed(7)
    x = z
    states = [z]
    for k in range(3):
        x = renoise(x0_of(x, steps[k]), steps[k + 1], g_hand)
        states.append(x)
    final = x0_of(x, steps[3])
    for k in range(4):
        got = backward_simulate(model, sch, z, steps, k, {}, torch.Generator().manual_seed(7))
        assert torch.allclose(got, states[k])
    assert torch.allclose(sample_student(model, sch, z, steps, {}, torch.Generator().manual_seed(7)), final)
    # continuing from step 1's x0 with the noise stream after the first draw gives the same sample
    g = torch.Generator().manual_seed(7)
    x1 = backward_simulate(model, sch, z, steps, 1, {}, g)
    assert torch.allclose(continue_from(model, sch, x0_of(x1, 749), steps, 1, 4, {}, g), final)
    assert not sample_student(model, sch, z, steps, {}, None).requires_grad


def test_cfg_predict_combines_branches():
    model = _Affine()
    x, t = torch.randn(3, 2), torch.tensor([10, 20, 30])
    cond, uncond = {"shift": torch.ones(3, 1)}, {"shift": torch.zeros(3, 1)}
    c, u = model(x, t, cond), model(x, t, uncond)
    assert torch.allclose(cfg_predict(model, x, t, cond, uncond, 4.0), u + 4.0 * (c - u))
    assert torch.allclose(cfg_predict(model, x, t, cond, uncond, 1.0), c)


@pytest.mark.parametrize("name", ["vp-eps", "vp-v", "flow"])
def test_teacher_sampler_is_exact_for_gaussian_data(name):
    # With the exact denoiser of Gaussian data, the probability-flow ODE maps N(0, I) onto the data
    # (mean mu, std c) when started from the exact p_T; DDIM/Euler with 100 steps must land close.
    sch = SCHEDULES[name]
    mu, c = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5

    class Exact(torch.nn.Module):
        def forward(self, x_t, t, cond):
            a, s = sch.alpha_sigma(t, x_t)
            var = a**2 * c**2 + s**2
            return sch.from_x0(mu + a * c**2 / var * (x_t - a * mu), x_t, t)

    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_start = sch.sampling_timesteps(100)[:1].expand(20000)
    a, s = sch.alpha_sigma(t_start, z)
    x_start = a * mu + (a**2 * c**2 + s**2).sqrt() * z  # exact p_T (VP's abar_999 > 0: not pure noise)
    x = sample_teacher(Exact(), sch, x_start, 100, {}, {})
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), c, dtype=torch.float64), atol=0.02)
    assert math.isfinite(x.abs().max().item())


def test_timesteps_must_be_1d():
    with pytest.raises(ValueError, match="1-D"):
        VPSchedule().alpha_sigma(torch.tensor(5))
