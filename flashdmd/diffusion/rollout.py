"""Student rollout: DMD2's backward simulation and LCM-style few-step sampling (spec 1.2, 1.4, 4.3).

The few-step generator G predicts x0 at each student timestep tau_0 > tau_1 > ... > tau_{n-1};
between steps the prediction is re-noised to the next timestep with FRESH noise (LCM-style):

    x_{tau_0} = z,   x0_k = G(x_{tau_k}, tau_k),   x_{tau_{k+1}} = alpha_{k+1} x0_k + sigma_{k+1} eps_k.

At tau_0 the input is pure noise (DMD2 replaces x_999 by z; for flow at t = 1000 this is exact).
All functions here run without gradients: the algorithm calls G with gradients itself on the
state these return. Noise comes from an injected ``torch.Generator`` so runs are reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flashdmd.diffusion.schedules import Schedule
from flashdmd.nets.interfaces import Conditioning


def randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor | None = None,
          device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to the data's device."""
    gen_device = generator.device if generator is not None else "cpu"
    dtype = like.dtype if like is not None else torch.float32
    target = like.device if like is not None else (device or gen_device)
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(target)


def timesteps_tensor(t: float, n: int, device: torch.device | str) -> Tensor:
    """One timestep for n samples, as the 1-D tensor every denoiser and schedule expects."""
    dtype = torch.long if isinstance(t, int) else torch.float32
    return torch.full((n,), t, dtype=dtype, device=device)


def predict_x0(model: nn.Module, schedule: Schedule, x_t: Tensor, t: float, cond: Conditioning) -> Tensor:
    """x0 estimate of a denoiser at one shared timestep (converted from its native prediction)."""
    tt = timesteps_tensor(t, x_t.shape[0], x_t.device)
    return schedule.to_x0(model(x_t, tt, cond), x_t, tt)


def renoise(schedule: Schedule, x0: Tensor, t: float, generator: torch.Generator | None) -> Tensor:
    """Forward diffusion of x0 to timestep t with fresh noise (the LCM transition)."""
    tt = timesteps_tensor(t, x0.shape[0], x0.device)
    return schedule.add_noise(x0, randn(x0.shape, generator, like=x0), tt)


@torch.no_grad()
def backward_simulate(model: nn.Module, schedule: Schedule, z: Tensor, timesteps: Sequence[int | float], k: int,
                      cond: Conditioning, generator: torch.Generator | None) -> Tensor:
    """The generator's input state at student step ``k`` (DMD2 backward simulation, spec 4.3).

    Runs steps 0..k-1 from pure noise ``z``; at ``k == 0`` returns ``z`` itself.
    """
    if not 0 <= k < len(timesteps):
        raise ValueError(f"student step index {k} outside 0..{len(timesteps) - 1}")
    x = z
    for j in range(k):
        x0 = predict_x0(model, schedule, x, timesteps[j], cond)
        x = renoise(schedule, x0, timesteps[j + 1], generator)
    return x


@torch.no_grad()
def continue_from(model: nn.Module, schedule: Schedule, x0: Tensor, timesteps: Sequence[int | float], k: int,
                  stop: int, cond: Conditioning, generator: torch.Generator | None) -> Tensor:
    """Given the x0 predicted at step ``k``, run steps k+1..stop-1 and return the last x0.

    ``stop = len(timesteps)`` rolls out to the clean sample (the paper's B(., 0), spec 1.4).
    """
    for j in range(k + 1, stop):
        x = renoise(schedule, x0, timesteps[j], generator)
        x0 = predict_x0(model, schedule, x, timesteps[j], cond)
    return x0


@torch.no_grad()
def sample_student(model: nn.Module, schedule: Schedule, z: Tensor, timesteps: Sequence[int | float],
                   cond: Conditioning, generator: torch.Generator | None) -> Tensor:
    """LCM-style few-step sampling from noise ``z`` (inference, no CFG: spec 1.2)."""
    x0 = predict_x0(model, schedule, z, timesteps[0], cond)
    return continue_from(model, schedule, x0, timesteps, 0, len(timesteps), cond, generator)
