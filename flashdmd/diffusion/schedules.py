"""Noise schedules: discrete VP (SD1.5/SDXL, epsilon or v prediction) and rectified flow (SD3).

Both kinds write the forward process as ``x_t = alpha_t x0 + sigma_t eps`` (spec notation):

- VP: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` with abar from the betas; model
  timesteps 0..T-1. Non-integer timesteps interpolate abar linearly (used only by toy families).
- Flow: ``alpha = 1 - s``, ``sigma = s`` with ``s = t / T`` (SD3: t = 1000 sigma); the model
  predicts the velocity ``eps - x0``. The shift acts on timestep sampling and on the teacher
  sampler's grid (SD3's ``s' = shift s / (1 + (shift - 1) s)``), not on the student timesteps,
  which are given directly in t (spec 1.2, option (a)).

Every method takes a 1-D tensor ``t`` with one entry per sample (float or long) and returns
tensors broadcast against the data. Conversions follow from the two linear relations between
(x_t, x0, eps) and the native prediction; the score is ``-(x_t - alpha x0) / sigma^2 = -eps / sigma``
(spec notation, Eq. 3 of the paper).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _bcast(v: Tensor, like: Tensor | None) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching ``like``'s rank and dtype; unchanged when ``like`` is None."""
    if like is None:
        return v.to(torch.float32)
    return v.to(like.dtype).reshape(v.shape + (1,) * (like.dim() - v.dim()))


class Schedule:
    """Shared conversions; subclasses define ``_alpha_sigma64`` and the native prediction."""

    kind: str
    prediction: str
    num_train_timesteps: int

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:  # float64, shape (B,)
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t), shaped to broadcast against ``like`` (else 1-D float32)."""
        t = _check_t(t)
        a, s = self._alpha_sigma64(t)
        return _bcast(a, like), _bcast(s, like)

    def snr(self, t: Tensor) -> Tensor:
        """alpha_t^2 / sigma_t^2 per sample (float64 for exact comparisons; inf at sigma = 0)."""
        a, s = self._alpha_sigma64(_check_t(t))
        return a**2 / s**2

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The native training target the model regresses (epsilon, v or flow velocity)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            a, s = self.alpha_sigma(t, x0)
            return a * noise - s * x0
        return noise - x0  # flow

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x_t)
        if self.prediction == "epsilon":
            return (x_t - s * pred) / a
        if self.prediction == "v_prediction":
            return a * x_t - s * pred
        return x_t - s * pred  # flow: x_t = x0 + s (eps - x0)

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x_t)
        if self.prediction == "epsilon":
            return pred
        if self.prediction == "v_prediction":
            return s * x_t + a * pred
        return x_t + a * pred  # flow: a = 1 - s

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The native prediction that corresponds to a clean estimate ``x0`` at ``x_t``."""
        a, s = self.alpha_sigma(t, x_t)
        eps = (x_t - a * x0) / s
        return self.target(x0, eps, t)

    def score(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """grad_x log p_t(x_t) = -eps / sigma_t."""
        _, s = self.alpha_sigma(t, x_t)
        return -self.to_eps(pred, x_t, t) / s

    def sample_t(self, n: int, lo: float = 0.0, hi: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """n timesteps uniform in the fraction range [lo, hi] of T (VP: integers; flow: floats)."""
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"sample_t: need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        T = self.num_train_timesteps
        gdev = generator.device if generator is not None else "cpu"
        if self.kind == "vp":
            low, high = round(lo * T), min(round(hi * T), T - 1)
            return torch.randint(low, max(high, low) + 1, (n,), generator=generator, device=gdev).to(device)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=gdev)
        return ((lo + (hi - lo) * u) * T).to(torch.float32).to(device)

    def sampling_timesteps(self, num_steps: int) -> Tensor:
        """The teacher sampler's grid, from the noisiest step down; 1-D, ``num_steps`` entries."""
        raise NotImplementedError


def _check_t(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"timesteps must be a 1-D tensor with one entry per sample, got {t!r}")
    return t


class VPSchedule(Schedule):
    """Discrete DDPM schedule (T = 1000): ``scaled_linear`` (SD1.5/SDXL) or ``linear`` betas."""

    kind = "vp"

    def __init__(self, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = 1000, prediction: str = "epsilon") -> None:
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"VPSchedule prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")
        T = num_train_timesteps
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            raise ValueError(f"VPSchedule beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        self.beta_schedule = beta_schedule
        self.prediction = prediction
        self.num_train_timesteps = T
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._tables: dict[torch.device, Tensor] = {}  # the table per device: no host copy per call

    def _abar_table(self, device: torch.device) -> Tensor:
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar_table = self._abar_table(t.device)
        T = self.num_train_timesteps
        if t.is_floating_point():
            tc = t.to(torch.float64).clamp(0, T - 1)
            lo = tc.floor().long()
            hi = (lo + 1).clamp(max=T - 1)
            w = tc - lo.to(torch.float64)
            abar = (1 - w) * abar_table[lo] + w * abar_table[hi]
        else:
            abar = abar_table[t.long().clamp(0, T - 1)]
        return abar.sqrt(), (1 - abar).sqrt()

    def sampling_timesteps(self, num_steps: int) -> Tensor:
        """DDIM "trailing" spacing: T-1, ..., evenly spaced, integers (includes T-1)."""
        T = self.num_train_timesteps
        return torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64) - 1).long()

    def __repr__(self) -> str:
        return f"VPSchedule({self.beta_schedule!r}, T={self.num_train_timesteps}, prediction={self.prediction!r})"


class FlowSchedule(Schedule):
    """Rectified flow (SD3): ``x_t = (1 - s) x0 + s eps``, ``s = t / T``, velocity prediction."""

    kind = "flow"
    prediction = "flow"

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000) -> None:
        if shift <= 0:
            raise ValueError(f"FlowSchedule shift must be > 0, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = (t.to(torch.float64) / self.num_train_timesteps).clamp(0.0, 1.0)
        return 1.0 - s, s

    def shift_sigma(self, s: Tensor) -> Tensor:
        """SD3's timestep shift s' = shift s / (1 + (shift - 1) s)."""
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sample_t_logit_normal(self, n: int, mean: float = 0.0, std: float = 1.0,
                              generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """SD3's training density: s = shift(sigmoid(N(mean, std))); returns t = T s (floats)."""
        gdev = generator.device if generator is not None else "cpu"
        u = torch.randn(n, generator=generator, dtype=torch.float64, device=gdev) * std + mean
        s = self.shift_sigma(torch.sigmoid(u))
        return (s * self.num_train_timesteps).to(torch.float32).to(device)

    def sampling_timesteps(self, num_steps: int) -> Tensor:
        """Euler grid: sigmas linspace(1, 1/n) shifted, as t = T s (floats)."""
        s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        return (self.shift_sigma(s) * self.num_train_timesteps).to(torch.float32)

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift}, T={self.num_train_timesteps})"
