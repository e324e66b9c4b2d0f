"""Decoding one raw sample: image -> [3, R, R] in [-1, 1] (resize + center crop), latent -> [C, h, w].

Each decoder returns the decoded sample or raises ``BadSample(reason)``; the pipeline turns that
into a skip that is counted (flashdmd.data.bad_samples). The resize follows the usual diffusers
training recipe (shorter side to R with bicubic (antialiased when shrinking), then a center crop) rather than a
random crop, so a resumed deterministic stream reproduces the same pixels.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from flashdmd.data.format import caption_of, image_ext
from flashdmd.data.shards import RawSample


class BadSample(Exception):
    """One sample is unusable for ``reason`` (one of flashdmd.data.bad_samples.REASONS)."""

    def __init__(self, reason: str, detail: object = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def decode_caption(raw: RawSample) -> str:
    try:
        caption = caption_of(raw.files)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample("missing_caption", repr(err)) from None
    if not caption:
        raise BadSample("missing_caption", f"members: {sorted(raw.files)}")
    return caption


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution`` (bicubic), then the central ``resolution`` square."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def decode_image(raw: RawSample, resolution: int) -> torch.Tensor:
    ext = image_ext(raw.files)
    if ext is None:
        raise BadSample("missing_image", f"members: {sorted(raw.files)}")
    try:
        with Image.open(io.BytesIO(raw.files[ext])) as img:
            img.load()  # force the full decode so truncated files fail here, not later
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadSample("corrupt_image", repr(err)) from None
    pixels = np.asarray(resize_center_crop(rgb, resolution), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


def decode_latent(raw: RawSample, expected: tuple[int, ...] | None) -> torch.Tensor:
    """The stored latent as float32 [C, h, w]; ``expected`` (C, h, w) is checked when given."""
    try:
        if "latent.npy" in raw.files:
            latent = torch.from_numpy(np.load(io.BytesIO(raw.files["latent.npy"]), allow_pickle=False).astype(np.float32))
        elif "latent.safetensors" in raw.files:
            latent = load_safetensors(raw.files["latent.safetensors"])["latent"].float()
        else:
            raise BadSample("missing_latent", f"members: {sorted(raw.files)}")
    except BadSample:
        raise
    except Exception as err:  # numpy/safetensors raise ValueError, KeyError, OSError, SafetensorError
        raise BadSample("corrupt_latent", repr(err)) from None
    if latent.ndim != 3 or (expected is not None and tuple(latent.shape) != tuple(expected)):
        raise BadSample("wrong_latent_shape", f"got {list(latent.shape)}, expected {list(expected or ('C', 'h', 'w'))}")
    if not torch.isfinite(latent).all():
        raise BadSample("corrupt_latent", "NaN or inf values")
    return latent
