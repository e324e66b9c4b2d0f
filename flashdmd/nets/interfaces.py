"""The small interfaces the algorithm is written against (DESIGN.md, "networks" layer).

Every family (gmm2d, tiny-*, sd15, sdxl, sd3) provides objects with these shapes, so the
stage-1/stage-2 code in ``flashdmd/algo`` never knows which family it runs.

Conditioning is a plain ``dict[str, Tensor]`` whose tensors all share the batch dimension
(SDXL: ``encoder_hidden_states``, ``pooled``, ``time_ids``; gmm2d: ``{}`` or class labels).
The helpers below batch, repeat and index it for CFG doubling and K-candidate sampling.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Conditioning = dict[str, Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """``model(x_t, t, cond)`` -> prediction in the schedule's native parameterisation.

    ``t`` is a 1-D tensor of model timesteps (VP: 0..999; flow: 1000 * sigma) with one entry per
    sample. The native parameterisation (epsilon, v or flow velocity) is the family schedule's
    ``prediction``; ``flashdmd.diffusion`` converts it to x0, epsilon or score.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """Latent -> pixels in [-1, 1], differentiable (the frozen VAE decoder V of spec 1.1)."""

    def __call__(self, latents: Tensor) -> Tensor: ...


@runtime_checkable
class Discriminator(Protocol):
    """Pixels -> one logit per sample (spec 1.8: frozen backbone, trainable heads)."""

    def __call__(self, images: Tensor) -> Tensor: ...


@runtime_checkable
class RewardModel(Protocol):
    """Noisy latents at timestep ``t`` -> one score per sample (the LRM of spec 2.2 / 3.1)."""

    def __call__(self, latents: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


def cat_cond(*conds: Conditioning) -> Conditioning:
    """Concatenate conditionings along the batch (e.g. [uncond, cond] for CFG)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def repeat_cond(cond: Conditioning, times: int) -> Conditioning:
    """Repeat every sample ``times`` times, keeping repeats adjacent (sample-major order)."""
    return {key: value.repeat_interleave(times, dim=0) for key, value in cond.items()}


def take_cond(cond: Conditioning, index: Tensor | slice) -> Conditioning:
    return {key: value[index] for key, value in cond.items()}
