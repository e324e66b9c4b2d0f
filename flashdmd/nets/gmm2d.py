"""The exact 2-D toy family ``gmm2d`` (DESIGN.md, toy world 1): every part of spec 1.1 in miniature.

- data: a 2-D Gaussian mixture fully set by ``model.gmm`` (means on a circle unless given,
  weights, one isotropic std);
- teacher: an MLP denoiser pretrained on mixture samples with the VP schedule (SDXL's betas),
  cached as safetensors under ``cache_dir`` keyed by a hash of everything that shapes it;
- generator and fake score: exact copies of the teacher (Algorithm 1 init);
- decoder V: a fixed invertible linear map (latents -> "pixels");
- discriminator: a frozen random-feature backbone with two taps, a trainable head per tap (the
  shape of spec 1.8's frozen SAM + heads);
- reward: a noise-aware closeness to one mode, ``r(x_t, t) = -|x_t - alpha_t m|^2 / (2 (alpha_t^2 std^2
  + sigma_t^2))`` (the log-density of the noised mode up to a constant), standing in for the LRM
  of spec 2.2, which also scores noisy latents at their own timestep.

Departure: the toy defaults to v-prediction (``model.prediction_type`` may set epsilon). An MLP
with epsilon output must resolve eps to ~1/15 of the x0 precision at t = 999 (alpha = 0.068),
which a small MLP trained for seconds does not; v keeps x0 errors at the scale of v errors.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd.config import Config, GMMConfig
from flashdmd.diffusion.schedules import Schedule, VPSchedule
from flashdmd.nets.dmd2_classifier import with_mode_discriminator
from flashdmd.nets.interfaces import Conditioning
from flashdmd.nets.parts import Parts

TEACHER_VERSION = "gmm2d-teacher-v3"  # bump when the MLP or its training changes
DEFAULT_PREDICTION = "v_prediction"


class GMM:
    """A 2-D Gaussian mixture: ``means`` (M, 2), ``weights`` (M,) summing to 1, isotropic ``std``.

    From the config: ``means`` lists the modes (then ``num_modes`` must equal their count, not
    be silently ignored), or ``num_modes`` modes sit on a circle of ``radius``; ``weights`` are
    relative (they are divided by their sum, so [3, 1] means 75 % / 25 %), non-negative, with a
    positive sum, one per mode; [] is uniform."""

    def __init__(self, means: Tensor, weights: Tensor, std: float) -> None:
        self.means = means.to(torch.float32)
        self.weights = (weights / weights.sum()).to(torch.float32)
        self.std = float(std)

    @classmethod
    def from_config(cls, g: GMMConfig) -> GMM:
        if g.means:
            if g.num_modes != len(g.means):
                raise ValueError(f"model.gmm.num_modes={g.num_modes} but model.gmm.means lists {len(g.means)} modes; "
                                 f"set model.gmm.num_modes={len(g.means)} (or leave model.gmm.means empty)")
            means = torch.tensor(g.means, dtype=torch.float32)
        else:
            angles = torch.arange(g.num_modes, dtype=torch.float64) * (2 * math.pi / g.num_modes)
            means = (g.radius * torch.stack([angles.cos(), angles.sin()], dim=1)).to(torch.float32)
        weights = torch.tensor(g.weights, dtype=torch.float32) if g.weights else torch.ones(len(means))
        if len(weights) != len(means) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("model.gmm.weights must be non-negative, one per mode, with a positive sum")
        return cls(means, weights, g.std)

    @property
    def num_modes(self) -> int:
        return len(self.means)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples and their mode labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.means[labels] + self.std * noise, labels


class TimeMLP(nn.Module):
    """Denoiser ``(x_t, t, cond) -> native prediction`` for 2-D points; ``cond`` is ignored."""

    def __init__(self, hidden: int = 256, num_freqs: int = 6, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.T = num_train_timesteps
        self.num_freqs = num_freqs
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * num_freqs + 1, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    @property
    def bottleneck(self) -> nn.Module:
        """The last hidden layer's activation: DMD2's classifier reads it (flashdmd/nets/dmd2_classifier.py)."""
        return self.net[-2]

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # time features in fp32 from constants (not a buffer, which a cast to bf16 would round),
        # then every input in the weights' dtype, as the image denoisers do: a bf16 copy and a
        # bf16 mixed-precision policy of the same weights compute the same numbers
        tau = (t.to(torch.float32) / self.T).unsqueeze(1)
        freqs = math.pi * 2.0 ** torch.arange(self.num_freqs, dtype=torch.float32, device=x_t.device)
        angles = tau * freqs
        features = torch.cat([x_t.to(torch.float32), angles.sin(), angles.cos(), tau], dim=1)
        return self.net(features.to(self.net[0].weight.dtype))


class LinearDecoder(nn.Module):
    """The toy VAE decoder V: a fixed invertible linear map (a shear and a rotation)."""

    def __init__(self) -> None:
        super().__init__()
        c, s = math.cos(0.5), math.sin(0.5)
        matrix = torch.tensor([[c, -s], [s, c]]) @ torch.tensor([[1.0, 0.4], [0.0, 0.8]])
        self.register_buffer("matrix", matrix)
        self.register_buffer("offset", torch.tensor([0.3, -0.2]))

    def forward(self, latents: Tensor) -> Tensor:
        return latents @ self.matrix.T + self.offset

    def encode(self, images: Tensor) -> Tensor:
        """The exact inverse (the toy's VAE encoder): real "pixels" back to latents."""
        return torch.linalg.solve(self.matrix, (images - self.offset).T).T


class RandomFeatureDiscriminator(nn.Module):
    """Frozen random-feature backbone with two taps, one trainable MLP head per tap; logit = mean."""

    def __init__(self, features: int = 64, head_hidden: int = 64, bandwidth: float = 1.0, seed: int = 1234) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # the heads' default init, seeded too: same seed, same network
            torch.manual_seed(seed)
            self._build(features, head_hidden, bandwidth, g)

    def _build(self, features: int, head_hidden: int, bandwidth: float, g: torch.Generator) -> None:
        self.tap1 = nn.Linear(2, features)
        self.tap2 = nn.Linear(2 * features, features)
        with torch.no_grad():
            self.tap1.weight.copy_(torch.randn(features, 2, generator=g) / bandwidth)
            self.tap1.bias.copy_(torch.rand(features, generator=g) * 2 * math.pi)
            self.tap2.weight.copy_(torch.randn(features, 2 * features, generator=g) / math.sqrt(2 * features))
            self.tap2.bias.zero_()
        for p in (*self.tap1.parameters(), *self.tap2.parameters()):
            p.requires_grad_(False)
        self.heads = nn.ModuleList([
            nn.Sequential(nn.Linear(dim, head_hidden), nn.SiLU(), nn.Linear(head_hidden, 1))
            for dim in (2 * features, features)
        ])

    def forward(self, images: Tensor) -> Tensor:
        h = self.tap1(images)
        f1 = torch.cat([h.sin(), h.cos()], dim=1)
        f2 = torch.nn.functional.silu(self.tap2(f1))
        return torch.stack([head(f).squeeze(1) for head, f in zip(self.heads, (f1, f2))]).mean(dim=0)


class GMMReward(nn.Module):
    """Noise-aware closeness of ``x_t`` to one mode (module docstring); 0 at the mode, negative elsewhere."""

    def __init__(self, mode: Tensor, std: float, schedule: Schedule) -> None:
        super().__init__()
        self.register_buffer("mode", mode.to(torch.float32))
        self.std = std
        self.schedule = schedule

    def forward(self, latents: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        a, s = self.schedule.alpha_sigma(t, latents)
        var = a**2 * self.std**2 + s**2
        return -(((latents - a * self.mode) ** 2) / (2 * var)).sum(dim=1)


def teacher_key(g: GMMConfig, prediction: str) -> str:
    """Hash of everything that determines the pretrained teacher."""
    gmm = GMM.from_config(g)
    payload = {"version": TEACHER_VERSION, "means": gmm.means.tolist(), "weights": gmm.weights.tolist(),
               "std": gmm.std, "steps": g.teacher_steps, "hidden": g.hidden, "prediction": prediction}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_teacher(gmm: GMM, schedule: Schedule, hidden: int, steps: int, batch: int = 512,
                     seed: int = 0) -> TimeMLP:
    """Denoising pretraining on fresh mixture samples with the schedule's native target."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TimeMLP(hidden, num_train_timesteps=schedule.num_train_timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        x0, _ = gmm.sample(batch, g)
        noise = torch.randn(batch, 2, generator=g)
        t = schedule.sample_t(batch, 0.0, 1.0, g)
        pred = model(schedule.add_noise(x0, noise, t), t, {})
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)  # no stale gradients travel into the generator's copy
    return model.eval().requires_grad_(False)


def load_or_train_teacher(cfg: Config, schedule: Schedule, cache_dir: Path) -> TimeMLP:
    g = cfg.model.gmm
    path = Path(cache_dir) / f"gmm2d-teacher-{teacher_key(g, schedule.prediction)}.safetensors"
    if path.is_file():
        model = TimeMLP(g.hidden, num_train_timesteps=schedule.num_train_timesteps)
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    model = pretrain_teacher(GMM.from_config(g), schedule, g.hidden, g.teacher_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), str(tmp), metadata={"version": TEACHER_VERSION})
    tmp.replace(path)  # atomic: concurrent runs never read a half-written teacher
    return model


def gmm_schedule(cfg: Config) -> VPSchedule:
    prediction = cfg.model.prediction_type or DEFAULT_PREDICTION
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"gmm2d is a VP toy: model.prediction_type must be '', 'epsilon' or 'v_prediction', "
                         f"got {prediction!r}")
    return VPSchedule("scaled_linear", 0.00085, 0.012, 1000, prediction)


def build_gmm_parts(cfg: Config, cache_dir: Path) -> Parts:
    """Every network of spec 1.1 for the toy; the teacher is pretrained once and cached."""
    schedule = gmm_schedule(cfg)
    gmm = GMM.from_config(cfg.model.gmm)
    teacher = load_or_train_teacher(cfg, schedule, cache_dir)
    generator = copy.deepcopy(teacher).requires_grad_(True).train()
    fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
    reward = GMMReward(gmm.means[cfg.model.gmm.reward_mode], gmm.std, schedule)
    decoder = LinearDecoder().requires_grad_(False)
    parts = Parts(
        family="gmm2d",
        schedule=schedule,
        latent_shape=(2,),
        teacher=teacher,
        generator=generator,
        fake_score=fake_score,
        decoder=decoder,
        discriminator=RandomFeatureDiscriminator(seed=cfg.seed),
        encode_prompts=lambda prompts: {},
        null_cond=lambda n: {},
        reward=reward.requires_grad_(False),
        encode_images=decoder.encode,
        exact=gmm,
        extras={"gmm": gmm, "reward_mode": cfg.model.gmm.reward_mode},
    )
    return with_mode_discriminator(cfg, parts)
