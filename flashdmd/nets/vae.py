"""The frozen VAE of a family: differentiable decode (latents -> pixels in [-1, 1]) and encode.

Latents in this project are the *scaled* latents the denoisers see:
``z = (vae_latent - shift) * scaling`` (SD1.5: 0.18215, SDXL: 0.13025, SD3: scaling 1.5305 and
shift 0.0609), read from the VAE's own config so a replacement VAE brings its own constants.
Decode is not under no_grad: the Pixel-GAN's generator loss (spec 1.8) backpropagates through
it into the generator while the VAE's own weights stay frozen. ``slice_size`` decodes/encodes
in chunks of that many samples to bound activation memory (diffusers' "slicing").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class VAEDecoder(nn.Module):
    """``decoder(latents)`` -> images in [-1, 1] (not clamped, so gradients are never cut)."""

    def __init__(self, vae: nn.Module, slice_size: int = 0) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.slice_size = slice_size

    def _dtype(self) -> torch.dtype:
        # ModelMixin.dtype walks every submodule on each call (2.8 ms per call on SDXL)
        return next(self.vae.parameters()).dtype

    def _chunks(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.slice_size)) if self.slice_size > 0 else [x]

    def forward(self, latents: Tensor) -> Tensor:
        dtype = self._dtype()
        outs = [self.vae.decode((z / self.scaling + self.shift).to(dtype), return_dict=False)[0]
                for z in self._chunks(latents)]
        return torch.cat(outs).to(latents.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (a posterior sample, or its mean with ``sample=False``)."""
        if images.min() < -1.001 or images.max() > 1.001:
            raise ValueError("encode_images expects pixels in [-1, 1]; rescale uint8 images with x / 127.5 - 1")
        outs = []
        for x in self._chunks(images):
            dist = self.vae.encode(x.to(self._dtype())).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            outs.append((z - self.shift) * self.scaling)
        return torch.cat(outs).to(images.dtype)
