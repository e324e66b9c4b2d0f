"""The gmm2d toy's exact teacher: the closed-form denoiser against Tweedie's formula by autograd,
its sampler against the true mixture, and the students built around it (flashdmd/nets/gmm2d.py)."""
from __future__ import annotations

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.diffusion.rollout import timesteps_tensor
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.eval.gmm import mode_mass, sliced_w2
from flashdmd.nets.dmd2_classifier import classifier_for
from flashdmd.nets.gmm2d import GMM, ExactGMMDenoiser, ResidualDenoiser, build_gmm_parts, gmm_schedule
from flashdmd.train.gmm_quality import quasi_normal, stratified_truth

SHARP = ["model.gmm.teacher=exact", "model.gmm.num_modes=5", "model.gmm.radius=3.0", "model.gmm.std=0.08",
         "model.gmm.weights=[4,2,1,1,1]"]


def noised_log_density(x_t: torch.Tensor, gmm: GMM, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log p_t(x_t) of the noised mixture, written as a sum of Gaussian densities (no posterior)."""
    var = a**2 * gmm.std**2 + s**2
    comps = torch.distributions.MultivariateNormal(
        a.reshape(-1, 1, 1) * gmm.means.double(), var.reshape(-1, 1, 1, 1) * torch.eye(2, dtype=torch.float64))
    return torch.logsumexp(comps.log_prob(x_t.unsqueeze(1)) + gmm.weights.double().log(), dim=1)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("t_value", [5, 249, 600, 999])
def test_exact_denoiser_is_tweedie_of_the_noised_mixture(prediction, t_value):
    """E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, the gradient taken by autograd of the
    mixture density: a different route to the same number than the closed-form responsibilities."""
    cfg = load_config("gmm2d", SHARP + [f"model.prediction_type={prediction}"])
    gmm, schedule = GMM.from_config(cfg.model.gmm), gmm_schedule(cfg)
    exact = ExactGMMDenoiser(gmm, schedule)
    g = torch.Generator().manual_seed(t_value)
    x0, _ = gmm.sample(64, g)
    t = timesteps_tensor(t_value, 64, "cpu")
    x_t = schedule.add_noise(x0, torch.randn(64, 2, generator=g), t)
    a, s = (v.double().squeeze(1) for v in schedule.alpha_sigma(t, x_t))
    x = x_t.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(noised_log_density(x, gmm, a, s).sum(), x)
    tweedie = (x_t.double() + s.unsqueeze(1) ** 2 * grad) / a.unsqueeze(1)
    assert torch.allclose(exact.posterior_mean(x_t, t).double(), tweedie, atol=2e-4)
    native = exact(x_t, t, {})
    assert torch.allclose(schedule.to_x0(native, x_t, t).double(), tweedie, atol=2e-3)


def test_exact_teacher_from_the_true_marginal_samples_the_mixture():
    """DDIM on the exact denoiser, started from the true x_999 marginal, lands on the mixture with
    its unequal weights at the noise floor; started from N(0, I) it misplaces mass, the
    terminal-SNR gap of SD's schedule (alpha_999 = 0.068), which a student may correct."""
    cfg = load_config("gmm2d", SHARP)
    gmm, schedule = GMM.from_config(cfg.model.gmm), gmm_schedule(cfg)
    exact = ExactGMMDenoiser(gmm, schedule)
    n = 4096
    truth = stratified_truth(gmm.means, gmm.weights, gmm.std, n, 1)
    floor = sliced_w2(stratified_truth(gmm.means, gmm.weights, gmm.std, n, 2), truth,
                      generator=torch.Generator().manual_seed(0))
    start = schedule.add_noise(stratified_truth(gmm.means, gmm.weights, gmm.std, n, 3), quasi_normal(n, 2, 4),
                               timesteps_tensor(999, n, "cpu"))
    x = sample_teacher(exact, schedule, start, 200, {}, {})
    sw2 = sliced_w2(x, truth, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mode_mass(x, gmm.means).float(), gmm.weights, atol=0.01)
    from_noise = sample_teacher(exact, schedule, quasi_normal(n, 2, 4), 200, {}, {})
    assert (mode_mass(from_noise, gmm.means)[0] - gmm.weights[0]).abs() > 0.01
    # what is left from the true marginal: the last step's x0 estimate at t = 4 narrows each mode
    # (posterior mean, std 0.08 -> ~0.05); from N(0, I) the misplaced mass dominates
    within = (x - gmm.means[torch.cdist(x, gmm.means).argmin(dim=1)]).pow(2).mean().sqrt()
    assert 0.5 * gmm.std < within < gmm.std
    assert floor < sw2 < 0.1 < sliced_w2(from_noise, truth, generator=torch.Generator().manual_seed(0))


def test_students_equal_the_exact_teacher_and_train_only_their_correction(tmp_path):
    cfg = load_config("gmm2d", SHARP + ["model.gmm.hidden=32"])
    parts = build_gmm_parts(cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing pretrained, nothing cached
    assert isinstance(parts.teacher, ExactGMMDenoiser) and not list(parts.teacher.parameters())
    x, t = torch.randn(7, 2), timesteps_tensor(499, 7, "cpu")
    for student in (parts.generator, parts.fake_score):
        assert isinstance(student, ResidualDenoiser)
        assert torch.equal(student(x, t, {}), parts.teacher(x, t, {}))  # Algorithm 1 init
        assert all(name.startswith("correction.") for name in student.state_dict())  # the mixture is config
        assert all(p.requires_grad for p in student.parameters())
    assert parts.generator.correction is not parts.fake_score.correction
    loss = parts.generator(x, t, {}).pow(2).sum()
    loss.backward()
    assert parts.generator.correction.net[-1].weight.grad.abs().sum() > 0
    head = classifier_for(parts.fake_score, parts.latent_shape)  # DMD2's classifier reads the correction
    assert sum(p.numel() for p in head.parameters()) > 0
