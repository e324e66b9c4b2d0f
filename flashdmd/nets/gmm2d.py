"""The exact 2-D toy family ``gmm2d`` (DESIGN.md, toy world 1): every part of spec 1.1 in miniature.

- data: a 2-D Gaussian mixture fully set by ``model.gmm`` (means on a circle unless given,
  weights, one isotropic std). The latents are that mixture rescaled to a root-mean-square size
  of ``LATENT_SCALE`` (``GMM.normalized``, the role of SD's VAE scaling factor), so one noise
  schedule and one set of learning rates serve any radius; ``parts.extras["gmm"]``, the reward
  and every toy metric are in latent units, and the decoder scales back to the configured units;
- teacher (``model.gmm.teacher``): ``mlp`` (default) is an MLP denoiser pretrained on mixture
  samples with the VP schedule (SDXL's betas) during setup (a preemption signal meanwhile is
  recorded, and the trainer saves and stops after its first step), cached as safetensors under ``cache_dir`` keyed by a hash of everything
  that shapes it (a requeued job reads it instead of training again). Its capacity follows the
  mixture: sin/cos features of x_t at ``space_octaves`` octaves, one more per halving of the
  modes' width, and pretraining timesteps balanced in log-SNR (``balanced_timesteps``), so its
  50-step samples sit within a few mode widths of a mean on sharp mixtures too.
  ``exact`` is the mixture's own denoiser, E[target | x_t] in closed form (Tweedie's formula on
  the noised mixture): the true score for any mixture, nothing to pretrain, and what is left of
  its samplers' SW2 is theirs (the last step's x0 estimate, the step count, and starting from
  N(0, I) where SD's schedule ends at alpha_999 = 0.068, which misplaces mass between unequal
  modes). Its students (exact + a zero-initialised MLP correction) barely move at generator_lr
  3e-5 and diverge at 3e-4 on the preset's ring: the ``mlp`` teacher is the one the benchmark distils;
- generator and fake score: equal to the teacher at the start (Algorithm 1 init). With the MLP
  teacher, copies of it; with the exact teacher each is the exact denoiser plus a trainable MLP
  correction whose last layer starts at zero (all the distillation learns lives in the correction);
- decoder V: a fixed invertible linear map (latents -> "pixels"), the rescaling included;
- discriminator: a frozen random-feature backbone with two taps, a trainable head per tap (the
  shape of spec 1.8's frozen SAM + heads), its random features spanning the mixture's length
  scales, from one mode's width to the whole mixture;
- reward: a noise-aware closeness to one mode, ``r(x_t, t) = -|x_t - alpha_t m|^2 / (2 (alpha_t^2 std^2
  + sigma_t^2))`` (the log-density of the noised mode up to a constant), standing in for the LRM
  of spec 2.2, which also scores noisy latents at their own timestep.

Departures: the toy defaults to v-prediction (``model.prediction_type`` may set epsilon). An MLP
with epsilon output must resolve eps to ~1/15 of the x0 precision at t = 999 (alpha = 0.068),
which a small MLP trained for seconds does not; v keeps x0 errors at the scale of v errors.
The latents are 4x the size of SD's unit-variance latents (``LATENT_SCALE``): in two dimensions
a unit-size mixture's neighbouring modes blur into one by the 4-step student's last input
(sigma 0.64 at t = 249), which high-dimensional image latents do not.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
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

log = logging.getLogger(__name__)
TEACHER_VERSION = "gmm2d-teacher-v6"  # bump when the MLP or its training changes
DEFAULT_PREDICTION = "v_prediction"
TEACHER_BATCH = 512
# the latents' root-mean-square size: the preset ring's. At unit size (SD's latent variance) the
# 4-step student's last input x_249 (sigma 0.64) blurs neighbouring modes into one in two
# dimensions, which SD's high-dimensional latents do not
LATENT_SCALE = 4.0
TEACHER_SEED = 0


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

    @property
    def scale(self) -> float:
        """Root-mean-square distance of a sample from the origin: the exact teacher's correction's input unit."""
        return math.sqrt(float((self.weights * self.means.pow(2).sum(dim=1)).sum()) + 2 * self.std**2)

    def normalized(self) -> GMM:
        """The mixture rescaled to ``LATENT_SCALE``: the toy's latents, one size for any radius
        (the role of SD's VAE scaling factor), so that one noise schedule and one set of learning
        rates fit every configured mixture."""
        k = LATENT_SCALE / self.scale
        return GMM(self.means * k, self.weights, self.std * k)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples and their mode labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.means[labels] + self.std * noise, labels


class TimeMLP(nn.Module):
    """Denoiser ``(x_t, t, cond) -> native prediction`` for 2-D points; ``cond`` is ignored."""

    def __init__(self, hidden: int = 256, num_freqs: int = 6, num_train_timesteps: int = 1000,
                 scale: float = 1.0, space_freqs: int = 0) -> None:
        super().__init__()
        self.T = num_train_timesteps
        self.scale = scale  # x_t enters as x_t / scale: unit-size inputs for any mixture radius
        self.num_freqs = num_freqs
        self.space_freqs = space_freqs
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(2 + 4 * space_freqs + 2 * num_freqs + 1, hidden), nn.SiLU(),
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
        # bf16 mixed-precision policy of the same weights compute the same numbers. x_t is rounded
        # to that dtype before the scaling, as such a policy rounds its inputs.
        dtype = self.net[0].weight.dtype
        x = x_t.to(dtype).to(torch.float32) / self.scale
        tau = (t.to(torch.float32) / self.T).unsqueeze(1)
        freqs = math.pi * 2.0 ** torch.arange(self.num_freqs, dtype=torch.float32, device=x_t.device)
        angles = tau * freqs
        # sin/cos of x at octaves 1 .. 2^(space_freqs - 1): a smooth-activation MLP on x alone
        # needs thousands of steps to grow the large first-layer weights that resolve modes
        # much narrower than the mixture (space_freqs scales with scale / std: space_octaves)
        octaves = math.pi * 2.0 ** torch.arange(self.space_freqs, dtype=torch.float32, device=x_t.device)
        space = (x.unsqueeze(2) * octaves).flatten(1)
        features = torch.cat([x, space.sin(), space.cos(), angles.sin(), angles.cos(), tau], dim=1)
        return self.net(features.to(dtype))


class ExactGMMDenoiser(nn.Module):
    """The mixture's exact native prediction ``E[target | x_t]``; no weights, nothing to train.

    x_t = alpha x0 + sigma eps with x0 from mode k is N(alpha m_k, v I), v = alpha^2 std^2 + sigma^2,
    so the posterior over modes is softmax_k(log w_k - |x_t - alpha m_k|^2 / 2v) and, within mode k,
    E[x0 | x_t, k] = m_k + (alpha std^2 / v)(x_t - alpha m_k). The native target (eps or v) is linear
    in (x0, eps) at fixed x_t, so its posterior mean is ``schedule.from_x0`` of E[x0 | x_t]."""

    def __init__(self, gmm: GMM, schedule: Schedule) -> None:
        super().__init__()
        # not saved in state dicts: the mixture comes from the config, never from a checkpoint
        self.register_buffer("means", gmm.means.clone(), persistent=False)
        self.register_buffer("log_weights", gmm.weights.clamp_min(1e-30).log(), persistent=False)
        self.std = gmm.std
        self.schedule = schedule

    def posterior_mean(self, x_t: Tensor, t: Tensor) -> Tensor:
        """E[x0 | x_t] in fp32 (a bf16 copy of the means is widened back, not computed in bf16)."""
        x = x_t.to(torch.float32)
        means = self.means.to(torch.float32)
        a, s = self.schedule.alpha_sigma(t, x)
        var = a**2 * self.std**2 + s**2
        offset = x.unsqueeze(1) - a.unsqueeze(1) * means  # (n, M, 2)
        logits = self.log_weights.to(torch.float32) - offset.pow(2).sum(dim=2) / (2 * var)
        resp = logits.softmax(dim=1)  # (n, M)
        within = means + (a * self.std**2 / var).unsqueeze(1) * offset
        return (resp.unsqueeze(2) * within).sum(dim=1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x = x_t.to(torch.float32)
        return self.schedule.from_x0(self.posterior_mean(x, t), x, t).to(x_t.dtype)


class ResidualDenoiser(nn.Module):
    """``exact(x_t, t) + correction(x_t, t)``: the exact teacher plus a trainable MLP whose last
    layer starts at zero, so at initialisation it equals the teacher exactly (Algorithm 1 init)."""

    def __init__(self, exact: ExactGMMDenoiser, correction: TimeMLP) -> None:
        super().__init__()
        self.exact = exact.requires_grad_(False)
        self.correction = correction
        with torch.no_grad():
            correction.net[-1].weight.zero_()
            correction.net[-1].bias.zero_()

    @property
    def hidden(self) -> int:
        return self.correction.hidden

    @property
    def bottleneck(self) -> nn.Module:
        """The correction's last hidden layer (DMD2's classifier reads it)."""
        return self.correction.bottleneck

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x_t = x_t.to(self.correction.net[0].weight.dtype)  # rounded as a mixed-precision policy rounds inputs
        out = self.correction(x_t, t, cond)
        return self.exact(x_t, t, cond).to(out.dtype) + out


class LinearDecoder(nn.Module):
    """The toy VAE decoder V: a fixed invertible linear map (a shear and a rotation)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        c, s = math.cos(0.5), math.sin(0.5)
        # latents are the mixture rescaled (GMM.normalized): the decoder scales them back
        matrix = scale * torch.tensor([[c, -s], [s, c]]) @ torch.tensor([[1.0, 0.4], [0.0, 0.8]])
        self.register_buffer("matrix", matrix)
        self.register_buffer("offset", torch.tensor([0.3, -0.2]))

    def forward(self, latents: Tensor) -> Tensor:
        return latents @ self.matrix.T + self.offset

    def encode(self, images: Tensor) -> Tensor:
        """The exact inverse (the toy's VAE encoder): real "pixels" back to latents."""
        return torch.linalg.solve(self.matrix, (images - self.offset).T).T


class RandomFeatureDiscriminator(nn.Module):
    """Frozen random-feature backbone with two taps, one trainable MLP head per tap; logit = mean.

    The first tap's random Fourier rows have length scales spread log-uniformly over
    ``length_scales`` (pixel units): from the modes' width, which tells a sharp mode from a
    blurred one, to the mixture's size, which weighs the modes' masses (the multi-scale
    features a frozen SAM gives the image discriminator, spec 1.8)."""

    def __init__(self, features: int = 64, head_hidden: int = 64, length_scales: tuple[float, float] = (1.0, 1.0),
                 seed: int = 1234) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # the heads' default init, seeded too: same seed, same network
            torch.manual_seed(seed)
            self._build(features, head_hidden, length_scales, g)

    def _build(self, features: int, head_hidden: int, length_scales: tuple[float, float], g: torch.Generator) -> None:
        self.tap1 = nn.Linear(2, features)
        self.tap2 = nn.Linear(2 * features, features)
        lo, hi = length_scales
        scales = lo * (hi / lo) ** torch.linspace(0.0, 1.0, features, dtype=torch.float64)
        with torch.no_grad():
            self.tap1.weight.copy_(torch.randn(features, 2, generator=g) / scales.unsqueeze(1).float())
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
    gmm = GMM.from_config(g).normalized()
    payload = {"version": TEACHER_VERSION, "means": gmm.means.tolist(), "weights": gmm.weights.tolist(),
               "std": gmm.std, "steps": g.teacher_steps, "hidden": g.hidden, "prediction": prediction,
               "batch": TEACHER_BATCH, "seed": TEACHER_SEED}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def space_octaves(gmm: GMM) -> int:
    """Spatial Fourier octaves of the MLP teacher for a unit-scale mixture: the highest, 2^(k-1) pi,
    reaches one period per ~pi mode widths, so the capacity grows with how sharp the modes are."""
    return max(1, math.ceil(math.log2(LATENT_SCALE / (math.pi * gmm.std))) + 1)


def balanced_timesteps(schedule: Schedule, n: int, generator: torch.Generator) -> Tensor:
    """Half uniform in t, half uniform in log-SNR: SD's betas give only ~2 % of uniform t to the
    low noise at which the teacher's last sampler steps resolve narrow modes."""
    T = schedule.num_train_timesteps
    a, s = schedule.alpha_sigma(torch.arange(T))
    log_snr = (a / s).log() * 2
    density = (log_snr[:-1] - log_snr[1:]).abs()
    low_noise = torch.multinomial(torch.cat([density, density[-1:]]), n - n // 2, replacement=True,
                                  generator=generator)
    return torch.cat([torch.randint(0, T, (n // 2,), generator=generator), low_noise])


def pretrain_teacher(gmm: GMM, schedule: Schedule, hidden: int, steps: int, batch: int = 512,
                     seed: int = 0) -> TimeMLP:
    """Denoising pretraining on fresh mixture samples with the schedule's native target, at
    log-SNR-balanced timesteps (``balanced_timesteps``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only contend, 100x slower on a loaded machine
    try:
        return _pretrain(gmm, schedule, hidden, steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(gmm: GMM, schedule: Schedule, hidden: int, steps: int, batch: int, seed: int) -> TimeMLP:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TimeMLP(hidden, num_train_timesteps=schedule.num_train_timesteps, space_freqs=space_octaves(gmm))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        x0, _ = gmm.sample(batch, g)
        noise = torch.randn(batch, 2, generator=g)
        t = balanced_timesteps(schedule, batch, g)
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
    gmm = GMM.from_config(g).normalized()
    path = Path(cache_dir) / f"gmm2d-teacher-{teacher_key(g, schedule.prediction)}.safetensors"
    if path.is_file():
        model = TimeMLP(g.hidden, num_train_timesteps=schedule.num_train_timesteps, space_freqs=space_octaves(gmm))
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    log.info("pretraining the gmm2d teacher: %d steps, width %d, into %s", g.teacher_steps, g.hidden, path)
    model = pretrain_teacher(gmm, schedule, g.hidden, g.teacher_steps, TEACHER_BATCH, TEACHER_SEED)
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


def _denoisers(cfg: Config, gmm: GMM, schedule: Schedule, cache_dir: Path) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(teacher, generator, fake score), the two students equal to the teacher (Algorithm 1 init)."""
    if cfg.model.gmm.teacher == "exact":
        teacher = ExactGMMDenoiser(gmm, schedule).eval()
        with torch.random.fork_rng():  # a fixed init, as a cached teacher's: same config, same students
            torch.manual_seed(TEACHER_SEED)
            correction = TimeMLP(cfg.model.gmm.hidden, num_train_timesteps=schedule.num_train_timesteps,
                                 scale=gmm.scale)
        generator = ResidualDenoiser(ExactGMMDenoiser(gmm, schedule), correction).train()
        return teacher, generator, copy.deepcopy(generator)
    teacher = load_or_train_teacher(cfg, schedule, cache_dir)
    generator = copy.deepcopy(teacher).requires_grad_(True).train()
    return teacher, generator, copy.deepcopy(generator)


def build_gmm_parts(cfg: Config, cache_dir: Path) -> Parts:
    """Every network of spec 1.1 for the toy; an MLP teacher is pretrained once and cached."""
    schedule = gmm_schedule(cfg)
    data = GMM.from_config(cfg.model.gmm)
    gmm = data.normalized()
    teacher, generator, fake_score = _denoisers(cfg, gmm, schedule, cache_dir)
    reward = GMMReward(gmm.means[cfg.model.gmm.reward_mode], gmm.std, schedule)
    decoder = LinearDecoder(data.scale / LATENT_SCALE).requires_grad_(False)
    parts = Parts(
        family="gmm2d",
        schedule=schedule,
        latent_shape=(2,),
        teacher=teacher,
        generator=generator,
        fake_score=fake_score,
        decoder=decoder,
        discriminator=RandomFeatureDiscriminator(length_scales=(data.std, data.scale), seed=cfg.seed),
        encode_prompts=lambda prompts: {},
        null_cond=lambda n: {},
        reward=reward.requires_grad_(False),
        encode_images=decoder.encode,
        exact=gmm,
        extras={"gmm": gmm, "reward_mode": cfg.model.gmm.reward_mode},
    )
    return with_mode_discriminator(cfg, parts)
