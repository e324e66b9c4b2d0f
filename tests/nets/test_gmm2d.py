"""The gmm2d toy family and its exact metrics; the distillation it exists to prove is measured on three
mixtures, the preset's first, in tests/nets/test_gmm2d_geometries.py."""
from __future__ import annotations

import math

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.diffusion.rollout import timesteps_tensor
from flashdmd.eval.gmm import mode_mass, modes_covered, sliced_w2
from flashdmd.nets.gmm2d import GMM, build_gmm_parts, teacher_key
from flashdmd.nets.interfaces import Decoder, Denoiser, Discriminator, RewardModel

SMALL = ["model.gmm.teacher_steps=30", "model.gmm.hidden=32"]
MLP = SMALL + ["model.gmm.teacher=mlp"]


def test_gmm_from_config_and_sampler():
    gmm = GMM.from_config(load_config("gmm2d").model.gmm)
    assert gmm.num_modes == 8 and torch.allclose(gmm.means.norm(dim=1), torch.full((8,), 4.0))
    x, labels = gmm.sample(40000, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(labels).float() / 40000, torch.full((8,), 0.125), atol=0.01)
    assert (x - gmm.means[labels]).std().item() == pytest.approx(0.3, rel=0.02)
    cfg = load_config("gmm2d", ["model.gmm.means=[[0, 0], [3, 0]]", "model.gmm.num_modes=2", "model.gmm.weights=[3, 1]",
                                "model.gmm.reward_mode=1"])
    custom = GMM.from_config(cfg.model.gmm)
    assert custom.weights.tolist() == [0.75, 0.25] and custom.means.tolist() == [[0, 0], [3, 0]]  # relative weights
    ignored = load_config("gmm2d", ["model.gmm.means=[[0, 0], [3, 0]]", "model.gmm.reward_mode=1"]).model.gmm
    with pytest.raises(ValueError, match=r"model.gmm.num_modes=8 but model.gmm.means lists 2 modes"):
        GMM.from_config(ignored)


def test_metrics_against_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g)
    # SW2 between N(0, I) and N(0, I) shifted by d along x: W2 of the projection is |d cos(theta)|,
    # and the root-mean over directions of d^2 cos^2 is d / sqrt(2)
    assert sliced_w2(x, x + torch.tensor([2.0, 0.0]), 2000, g) == pytest.approx(2 / math.sqrt(2), rel=0.03)
    assert sliced_w2(x, x.flip(0)) == pytest.approx(0.0, abs=1e-12)  # a permutation is the same set
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.tensor([[0.1, 0.0], [9.0, 1.0], [8.0, 0.0], [1.0, 1.0]])
    mass = mode_mass(pts, means)
    assert mass.tolist() == [0.5, 0.5, 0.0]
    assert modes_covered(mass, torch.tensor([0.4, 0.4, 0.2])) == 2
    with pytest.raises(ValueError, match="equal size"):
        sliced_w2(x, x[:10])


def test_parts_shapes_roles_and_teacher_cache(tmp_path):
    cfg = load_config("gmm2d", MLP)
    parts = build_gmm_parts(cfg, tmp_path)
    files = list(tmp_path.glob("gmm2d-teacher-*.safetensors"))
    assert [f.name for f in files] == [f"gmm2d-teacher-{teacher_key(cfg.model.gmm, 'v_prediction')}.safetensors"]
    again = build_gmm_parts(cfg, tmp_path)  # from the cache: identical teacher, no retraining
    assert all(torch.equal(a, b) for a, b in zip(parts.teacher.state_dict().values(), again.teacher.state_dict().values()))
    x, t = torch.randn(5, 2), timesteps_tensor(500, 5, "cpu")
    assert isinstance(parts.teacher, Denoiser) and isinstance(parts.decoder, Decoder)
    assert isinstance(parts.discriminator, Discriminator) and isinstance(parts.reward, RewardModel)
    for net in (parts.teacher, parts.generator, parts.fake_score):
        assert net(x, t, {}).shape == (5, 2)
    assert torch.equal(parts.generator(x, t, {}), parts.teacher(x, t, {}))  # Algorithm 1 init
    assert all(p.requires_grad for p in parts.generator.parameters())
    assert not any(p.requires_grad for p in parts.teacher.parameters())
    assert all(p.grad is None for p in parts.generator.parameters())
    d_trainable = {n for n, p in parts.discriminator.named_parameters() if p.requires_grad}
    assert d_trainable and all(n.startswith("heads.") for n in d_trainable)
    m = parts.decoder.matrix  # invertible linear map
    assert abs(torch.det(m).item()) > 0.1 and torch.allclose(parts.decoder(x), x @ m.T + parts.decoder.offset)
    assert parts.encode_prompts(["a"]) == {} and parts.null_cond(3) == {}
    assert parts.discriminator(parts.decoder(x)).shape == (5,)
    with pytest.raises(ValueError, match="prediction_type"):
        build_gmm_parts(load_config("gmm2d", MLP + ["model.prediction_type=flow"]), tmp_path)
    other = build_gmm_parts(load_config("gmm2d", MLP + ["model.gmm.std=0.1"]), tmp_path)  # another mixture
    assert len(list(tmp_path.glob("gmm2d-teacher-*.safetensors"))) == 2
    assert not torch.equal(other.teacher(x, t, {}), parts.teacher(x, t, {}))


def test_reward_is_the_noised_mode_log_density_up_to_a_constant(tmp_path):
    parts = build_gmm_parts(load_config("gmm2d", SMALL), tmp_path)
    gmm = parts.extras["gmm"]  # the latents' mixture (the configured one rescaled, GMM.normalized)
    mode = gmm.means[0]
    t = timesteps_tensor(749, 3, "cpu")
    a, s = parts.schedule.alpha_sigma(t[:1])
    var = a**2 * gmm.std**2 + s**2
    pts = torch.stack([a * mode, a * mode + torch.tensor([1.0, 0.0]), -a * mode])
    dist = torch.distributions.MultivariateNormal(a * mode, var * torch.eye(2))
    logp = dist.log_prob(pts)
    got = parts.reward(pts, t, {})
    assert got[0].item() == 0.0 and torch.allclose(got - got[0], logp - logp[0], atol=1e-5)
