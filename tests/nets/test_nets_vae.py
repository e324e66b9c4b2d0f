"""VAE wrapper: scaling/shift conventions, slicing, encode; bf16 frozen nets and gradient checkpointing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.nets.families import get_family
from flashdmd.nets.load import load_pipeline_folder
from flashdmd.nets.registry import build_parts
from flashdmd.nets.tiny import ensure_tiny_teacher
from flashdmd.nets.vae import VAEDecoder


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3"])
def test_decode_encode_conventions(name: str, cache: Path) -> None:
    family = get_family(name)
    vae = load_pipeline_folder(ensure_tiny_teacher(family, cache), family).vae.eval()
    decoder = VAEDecoder(vae)
    assert decoder.scaling == pytest.approx(family.scaling_factor) and decoder.shift == pytest.approx(family.shift_factor)
    z = torch.randn(3, *family.latent_shape(64))
    with torch.no_grad():
        images = decoder(z)
        expected = vae.decode(z / family.scaling_factor + family.shift_factor).sample  # diffusers' pipeline decode
        torch.testing.assert_close(images, expected)
        decoder.slice_size = 1
        torch.testing.assert_close(decoder(z), images, atol=1e-5, rtol=1e-5)
    pixels = images.clamp(-1, 1)
    latents = decoder.encode(pixels, sample=False)
    raw = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - family.shift_factor) * family.scaling_factor, atol=1e-5, rtol=1e-5)
    assert latents.shape == z.shape
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        decoder.encode(pixels * 255)


def test_bf16_frozen_nets_and_checkpointing(cache: Path) -> None:
    cfg = load_config("tiny-sdxl", ["model.dtype=bf16", "engine.gradient_checkpointing=true",
                                    "engine.sam_checkpointing=true", "engine.decoder_checkpointing=true"])
    parts = build_parts(cfg, cache)
    assert parts.teacher.model.dtype == torch.bfloat16 and parts.decoder.vae.dtype == torch.bfloat16
    assert parts.generator.model.dtype == torch.float32  # trainable masters stay fp32
    assert parts.generator.model.is_gradient_checkpointing
    sam = parts.discriminator.backbone.encoder
    assert getattr(sam, "is_activation_checkpointing", None) or sam.is_gradient_checkpointing
    parts.discriminator.eval()
    assert sam.training  # transformers checkpoints training-mode layers only (nets/discriminator.py)
    assert parts.decoder.vae.decoder.gradient_checkpointing
    cond = parts.encode_prompts(["a cat", "a dog"])
    x, t = torch.randn(2, *parts.latent_shape), torch.tensor([249, 249])
    with torch.no_grad():
        assert parts.teacher(x, t, cond).dtype == torch.float32  # adapters return the caller's dtype
    logits = parts.discriminator(parts.decoder(parts.generator.predict_x0(x, t, cond)))
    logits.mean().backward()
    assert all(p.grad is not None for p in parts.generator.parameters())
