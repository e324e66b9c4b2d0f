"""Pixel-GAN discriminator (spec 1.8): frozen SAM vision encoder + trainable heads on tapped blocks.

Input: decoded images in [-1, 1]. They are mapped to [0, 1], normalised with SAM's pixel
statistics and resized (bilinear, differentiable) to the encoder's input size when they differ.
The encoder runs WITHOUT no_grad (its weights are frozen, but the generator's gradient must flow
through it). Features of the tapped transformer blocks (1-indexed; default 4 evenly spaced ones,
which for ViT-B/L/H are exactly SAM's global-attention blocks) go through one head each:
ADM-style [Conv 4x4 s2 -> GroupNorm -> SiLU] until the map is 8x8 (64 -> 8 for SAM at 1024 px),
then Conv 3x3 -> GN -> SiLU, global average pool and Linear -> one logit. The output is the mean
of the heads' logits, one per sample ([INF] spec 1.8; the paper's head sizes are unknown).

The backbone is pluggable: anything with ``image_size``, ``mean``/``std`` and
``features(images) -> list[(B, C, H, W)]`` works; ``SamBackbone`` wraps transformers' SAM.

Checkpointing (``engine.sam_checkpointing``): transformers recomputes a layer in backward only
when the layer is in training mode, so a frozen encoder kept in eval() is never checkpointed.
``enable_checkpointing`` therefore keeps the encoder in training mode, after checking
that training mode changes nothing SAM computes: every dropout probability is 0 and every norm
is a LayerNorm (no batch statistics). ``tests/nets/test_nets_savers.py`` checks features and
gradients are equal with and without, and that the saved-tensor bytes drop.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class SamBackbone(nn.Module):
    """Frozen transformers SAM vision encoder; ``features`` returns the tapped blocks channels-first."""

    def __init__(self, encoder: nn.Module, taps: list[int] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        depth = config.num_hidden_layers
        # default: 4 evenly spaced blocks (SAM ViT-B/L/H: exactly the global-attention blocks)
        self.taps = list(taps) if taps else sorted({max(1, depth * (i + 1) // 4) for i in range(4)})
        bad = [k for k in self.taps if not 1 <= k <= depth]
        if bad:
            raise ValueError(f"model.sam_taps {bad} out of range: the SAM encoder has blocks 1..{depth}")
        self.image_size = int(config.image_size)
        self.channels = [int(config.hidden_size)] * len(self.taps)
        self.feature_size = self.image_size // int(config.patch_size)
        self.register_buffer("mean", torch.tensor(SAM_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SAM_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.checkpointing = False

    @classmethod
    def from_pretrained(cls, folder: Path, taps: list[int] | None = None,
                        dtype: torch.dtype = torch.float32) -> "SamBackbone":
        """A SamVisionModel folder, or a full SamModel folder (facebook/sam-vit-*) whose vision encoder is used."""
        from transformers import SamModel, SamVisionModel

        config_path = Path(folder) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"model.sam: '{folder}' has no config.json; expected a transformers SamModel or "
                             f"SamVisionModel folder (e.g. facebook/sam-vit-large)")
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type == "sam":
            encoder = SamModel.from_pretrained(folder, torch_dtype=dtype).vision_encoder
        elif model_type == "sam_vision_model":
            encoder = SamVisionModel.from_pretrained(folder, torch_dtype=dtype)
        else:
            raise ValueError(f"model.sam: '{folder}' holds a '{model_type}' model, not SAM (model_type 'sam' or "
                             f"'sam_vision_model')")
        return cls(encoder, taps)

    def enable_checkpointing(self) -> None:
        """Recompute SAM's activations in backward (spec 1.8: the pixel GAN's memory cost)."""
        check_mode_invariant(self.encoder)
        set_checkpointing(self.encoder, True)
        self.checkpointing = True
        self.encoder.train()  # transformers checkpoints training-mode layers only

    def train(self, mode: bool = True) -> "SamBackbone":
        super().train(mode)
        # frozen: eval() unless checkpointing needs training mode (which changes nothing, see above)
        self.encoder.train(self.checkpointing)
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        x = (images.float() + 1) / 2
        x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(pixel_values=x.to(dtype), output_hidden_states=True).hidden_states
        return [hidden[k].permute(0, 3, 1, 2).float() for k in self.taps]  # (B, H, W, C) -> (B, C, H, W)


def check_mode_invariant(encoder: nn.Module) -> None:
    """Raise unless train() and eval() compute the same thing: no active dropout, no batch statistics."""
    config = getattr(encoder, "config", None)
    names = ("dropout", "attention_dropout", "hidden_dropout")
    rates = {name: float(getattr(config, name, 0.0) or 0.0) for name in names}
    rates.update({name: m.p for name, m in encoder.named_modules() if isinstance(m, nn.Dropout)})
    active = {name: p for name, p in rates.items() if p > 0}
    stats = [name for name, m in encoder.named_modules() if isinstance(m, (_BatchNorm, _InstanceNorm))]
    if active or stats:
        raise ValueError(f"engine.sam_checkpointing needs an encoder whose training mode changes nothing; this one has "
                         f"dropout {active} and batch-statistics norms {stats[:3]}: set engine.sam_checkpointing=false")


def set_checkpointing(encoder: nn.Module, on: bool) -> None:
    """transformers' gradient checkpointing switch (renamed activation checkpointing in 5.2x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        if on:
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.activation_checkpointing_disable()
    elif on:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_disable()


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 and channels >= 128 else math.gcd(channels, 8), channels)


class DiscriminatorHead(nn.Module):
    """ADM-style 2-D head: strided convs down to 8x8, one 3x3 conv, average pool, one logit."""

    def __init__(self, in_channels: int, feature_size: int, width: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, feature_size
        while size > 8:
            layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), _norm(width), nn.SiLU()]
            channels, size = width, size // 2
        layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(width), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)

    def forward(self, feature: Tensor) -> Tensor:
        return self.out(self.body(feature).mean(dim=(2, 3))).squeeze(1)


class PixelGANDiscriminator(nn.Module):
    """``D(images in [-1, 1])`` -> one logit per sample; only the heads have trainable parameters."""

    def __init__(self, backbone: SamBackbone, head_width: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(DiscriminatorHead(c, backbone.feature_size, head_width) for c in backbone.channels)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.backbone.features(images)
        return torch.stack([head(f) for head, f in zip(self.heads, feats)]).mean(0)
