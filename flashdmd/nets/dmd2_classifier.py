"""DMD2's GAN classifier: a head on the fake-score network's bottleneck features (spec 4.2), the
discriminator of the real DMD2 baseline (``stage1.mode=dmd2``).

DMD2 runs its fake ("guidance") UNet in a classify mode and reads the mid-block output
(1280 x 32 x 32 for 1024 px SDXL); the head is [Conv4x4 s2 -> GroupNorm(32) -> SiLU] x 3
(32 -> 16 -> 8 -> 4), then [Conv4x4 s4 -> GroupNorm -> SiLU] (4 -> 1), then Conv1x1 -> one logit.
``ClassifierHead`` builds that chain for any bottleneck size: stride-2 blocks while the map is
larger than 4, the stride-4 block at 4, a mean over what remains below 4 (tiny presets), the 1x1
logit. The classification loss trains the head AND the fake score through the features (the
"dual role" Flash-DMD removes); only the head is this module's parameters, the fake score stays
its own trainable network, and ``BottleneckTap`` reads its features during an ordinary forward.

Where the features come from: the UNet's ``mid_block``; for SD3's MMDiT (DMD2 has no MMDiT
recipe) the image tokens after the middle transformer block, laid out on their patch grid; for
the gmm2d MLP the last hidden layer (a vector: the head is then Linear -> SiLU -> Linear).
Departure: the tap runs the fake score's whole forward and discards the output, so the up blocks
(UNet) or the later blocks (MMDiT) are computed for nothing in each classify call; DMD2 stops at
the mid block. No gradient flows through the discarded part.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from flashdmd.config import Config
from flashdmd.nets.parts import Parts


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as DMD2 (1280 channels), with at least 4 channels per group on narrow tiny
    heads: on the final 1x1 map a group of one channel would normalise every logit to 0."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


class ClassifierHead(nn.Module):
    """Bottleneck features (B, C, s, s), or (B, C) for vector features -> logits (B,)."""

    def __init__(self, channels: int, size: int | None) -> None:
        super().__init__()
        c = channels
        if size is None:
            layers: list[nn.Module] = [nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1)]
        else:
            layers = []
            while size > 4:
                layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), _norm(c), nn.SiLU()]
                size //= 2
            if size == 4:
                layers += [nn.Conv2d(c, c, 4, stride=4), _norm(c), nn.SiLU()]
            elif size > 1:
                layers.append(nn.AdaptiveAvgPool2d(1))
            layers.append(nn.Conv2d(c, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features.to(self.layers[-1].weight.dtype)).flatten(1).mean(dim=1)


def _grid(tokens: Tensor) -> Tensor:
    """(B, N, C) image tokens -> (B, C, g, g) on their square patch grid."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"DMD2 classifier: {n} image tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, c, g, g)


class BottleneckTap:
    """Keeps the fake score's bottleneck output of the forwards run inside ``capture()``.

    The hook sits on the raw module, so it fires whatever wrapper an engine puts around the
    network (DDP, FSDP2, ZeRO-3): the features keep their autograd graph to the fake score's
    parameters and to the input."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.module, self.kind = bottleneck_module(denoiser)
        self.module.register_forward_hook(self._hook)
        self._armed = False
        self.features: Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed:
            return
        if self.kind == "tokens":
            self.features = _grid(output[1])  # JointTransformerBlock -> (text tokens, image tokens)
        else:
            self.features = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[BottleneckTap]:
        self._armed, self.features = True, None
        try:
            yield self
        finally:
            self._armed = False


def bottleneck_module(denoiser: nn.Module) -> tuple[nn.Module, str]:
    """(the module whose output is the bottleneck, "map" | "tokens" | "vector"); ``denoiser`` is a
    family's denoiser or the diffusers model itself (the planner counts FLOPs on the latter)."""
    if hasattr(denoiser, "bottleneck"):  # the gmm2d MLP names its last hidden layer
        return denoiser.bottleneck, "vector"
    model = getattr(denoiser, "model", denoiser)
    if model is not None and hasattr(model, "mid_block"):
        return model.mid_block, "map"
    if model is not None and hasattr(model, "transformer_blocks"):
        blocks = model.transformer_blocks
        return blocks[max(0, len(blocks) // 2 - 1)], "tokens"
    raise ValueError(f"stage1.mode=dmd2: no bottleneck known for {type(denoiser).__name__}")


def classifier_for(denoiser: nn.Module, latent_shape: tuple[int, ...]) -> ClassifierHead:
    """The head sized for ``denoiser``'s bottleneck on latents of ``latent_shape``."""
    module, kind = bottleneck_module(denoiser)
    if kind == "vector":
        return ClassifierHead(denoiser.hidden, None)
    config = denoiser.model.config
    if kind == "map":
        return ClassifierHead(config.block_out_channels[-1],
                              latent_shape[-1] // 2 ** (len(config.block_out_channels) - 1))
    return ClassifierHead(config.num_attention_heads * config.attention_head_dim, latent_shape[-1] // config.patch_size)


def with_mode_discriminator(cfg: Config, parts: Parts) -> Parts:
    """``parts`` with the discriminator ``stage1.mode`` trains: the classifier head in dmd2 mode,
    the family's Pixel-GAN otherwise (flash, and the dmd2_pixelgan ablation)."""
    if cfg.stage1.mode != "dmd2":
        return parts
    return dataclasses.replace(parts, discriminator=classifier_for(parts.fake_score, parts.latent_shape))
