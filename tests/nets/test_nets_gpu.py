"""The tiny families on a CUDA device under bf16 autocast (skipped without CUDA)."""
from __future__ import annotations


import pytest
import torch

from flashdmd.config import load_config
from flashdmd.nets.interfaces import cat_cond
from flashdmd.nets.registry import build_parts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-sd3"])
def test_tiny_family_on_cuda(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    parts = build_parts(load_config(name), tmp_path_factory.getbasetemp() / "nets-cache")
    device = torch.device("cuda")
    for module in (parts.teacher, parts.generator, parts.fake_score, parts.decoder, parts.discriminator,
                   parts.reward, parts.extras["text_encoder"]):
        module.to(device)
    cond = parts.encode_prompts(["a cat", "a dog"])
    null = parts.null_cond(2)
    assert all(v.device.type == "cuda" for v in {**cond, **null}.values())
    x = torch.randn(2, *parts.latent_shape, device=device)
    t = torch.tensor([999, 249], device=device)
    t = t.float() if parts.schedule.kind == "flow" else t
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            guided = parts.teacher(torch.cat([x, x]), torch.cat([t, t]), cat_cond(null, cond))
            scores = parts.reward(x, t, cond)
        logits = parts.discriminator(parts.decoder(parts.generator.predict_x0(x, t, cond)))
    logits.mean().backward()
    assert guided.shape == (4, *parts.latent_shape) and scores.shape == (2,) and logits.shape == (2,)
    assert torch.isfinite(guided).all() and torch.isfinite(scores).all()
    grads = [p.grad for p in parts.generator.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
