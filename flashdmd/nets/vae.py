"""The frozen VAE of a family: differentiable decode (latents -> pixels in [-1, 1]) and encode.

Latents in this project are the *scaled* latents the denoisers see:
``z = (vae_latent - shift) * scaling`` (SD1.5: 0.18215, SDXL: 0.13025, SD3: scaling 1.5305 and
shift 0.0609), read from the VAE's own config so a replacement VAE brings its own constants.
Decode is not under no_grad: the Pixel-GAN's generator loss (spec 1.8) backpropagates through
it into the generator while the VAE's own weights stay frozen.

Memory savers (config ``engine.decoder_checkpointing`` / ``engine.decode_micro_batch``): at
1024 px the decoder's saved activations dominate a GAN-branch turn (about 11 GiB per SDXL sample
in bf16), so with checkpointing the decoder's mid and up blocks are recomputed in backward
(diffusers' own block checkpointing), and with a micro-batch each chunk of ``slice_size``
samples is additionally checkpointed as a whole: forward keeps only the chunks' latents, and
backward recomputes one chunk at a time. Neither changes a value: the recomputation runs the
same kernels on the same inputs. Without checkpointing, chunks only bound the no-grad
encode/decode peak (diffusers' "slicing").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flashdmd.nets.denoiser import param_dtype


class VAEDecoder(nn.Module):
    """``decoder(latents)`` -> images in [-1, 1] (not clamped, so gradients are never cut)."""

    def __init__(self, vae: nn.Module, slice_size: int = 0, checkpointing: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.slice_size = slice_size
        self.checkpointing = False
        if checkpointing:
            self.enable_checkpointing()

    def enable_checkpointing(self) -> None:
        """Recompute the decoder in backward (block by block, and chunk by chunk with ``slice_size``)."""
        self.vae.enable_gradient_checkpointing()
        self.checkpointing = True

    def _chunks(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.slice_size)) if self.slice_size > 0 else [x]

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode((z / self.scaling + self.shift).to(param_dtype(self.vae)), return_dict=False)[0]

    def forward(self, latents: Tensor) -> Tensor:
        outer = self.checkpointing and self.slice_size > 0 and torch.is_grad_enabled() and latents.requires_grad
        outs = [checkpoint(self._decode, z, use_reentrant=False) if outer else self._decode(z)
                for z in self._chunks(latents)]
        return torch.cat(outs).to(latents.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (a posterior sample, or its mean with ``sample=False``)."""
        if images.min() < -1.001 or images.max() > 1.001:
            raise ValueError("encode_images expects pixels in [-1, 1]; rescale uint8 images with x / 127.5 - 1")
        outs = []
        for x in self._chunks(images):
            dist = self.vae.encode(x.to(param_dtype(self.vae))).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            outs.append((z - self.shift) * self.scaling)
        return torch.cat(outs).to(images.dtype)
