"""Tiny families end to end on CPU: save/load round trip, CFG shapes, x0 conversion, gradient flow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.nets.families import get_family
from flashdmd.nets.interfaces import cat_cond
from flashdmd.nets.load import load_pipeline_folder
from flashdmd.nets.registry import build_parts
from flashdmd.nets.tiny import tiny_teacher_pipeline

FAMILIES = ["tiny-sd15", "tiny-sdxl", "tiny-sd3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"  # shared by every test_nets_* file


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request: pytest.FixtureRequest, cache: Path):
    cfg = load_config(request.param, ["model.lora.enabled=false"])
    return build_parts(cfg, cache)


def _t(parts, values):
    dtype = torch.float32 if parts.schedule.kind == "flow" else torch.long
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip(name: str, cache: Path) -> None:
    family = get_family(name)
    cfg = load_config(name)
    parts = build_parts(cfg, cache)
    folder = parts.extras["teacher_dir"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    reference = tiny_teacher_pipeline(family)  # the same seeded build, never saved
    loaded = load_pipeline_folder(folder, family)
    ref_model = reference.unet if family.kind != "sd3" else reference.transformer
    for key, value in ref_model.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[key], value), key
    for key, value in reference.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[key], value), key
    ids = reference.tokenizer(["a red car"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizers[0](["a red car"], padding="max_length", max_length=16,
                                            return_tensors="pt").input_ids, ids)
    # built once per cache folder: a second build reuses it
    assert build_parts(cfg, cache).extras["teacher_dir"] == folder


def test_cfg_batch_doubling_shapes(parts) -> None:
    b = 3
    cond = parts.encode_prompts(["a cat", "a dog", "a bowl of fruit"])
    both = cat_cond(parts.null_cond(b), cond)
    x = torch.randn(b, *parts.latent_shape)
    t = _t(parts, [999, 500, 10] if parts.schedule.kind == "vp" else [1000.0, 500.0, 10.0])
    with torch.no_grad():
        out = parts.teacher(torch.cat([x, x]), torch.cat([t, t]), both)
    assert out.shape == (2 * b, *parts.latent_shape)
    uncond, condout = out.chunk(2)
    guided = uncond + 7.5 * (condout - uncond)
    assert guided.shape == (b, *parts.latent_shape)
    with torch.no_grad():  # doubling is exact: the conditional half equals a plain conditional call
        single = parts.teacher(x, t, cond)
    torch.testing.assert_close(condout, single, atol=1e-4, rtol=1e-4)
    assert parts.latent_shape == ((16 if parts.family == "tiny-sd3" else 4), 8, 8)


def test_x0_matches_schedule(parts) -> None:
    from diffusers import DDPMScheduler

    cond = parts.encode_prompts(["a cat", "a dog"])
    x = torch.randn(2, *parts.latent_shape)
    with torch.no_grad():
        if parts.schedule.kind == "vp":
            t = torch.tensor([999, 249])
            eps = parts.teacher(x, t, cond)
            # reference alphas from diffusers' own DDPM scheduler with SD's betas
            abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[t]
            abar = abar.view(-1, 1, 1, 1)
            expected = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        else:
            t = torch.tensor([1000.0, 250.0])
            v = parts.teacher(x, t, cond)
            expected = x - (t / 1000).view(-1, 1, 1, 1) * v  # x_t = (1 - s) x0 + s eps, v = eps - x0
        x0 = parts.teacher.predict_x0(x, t, cond)
    torch.testing.assert_close(x0, expected, atol=1e-4, rtol=1e-4)


def test_generator_and_fake_score_start_at_teacher(parts) -> None:
    cond = parts.encode_prompts(["a cat"])
    x, t = torch.randn(1, *parts.latent_shape), _t(parts, [499])
    with torch.no_grad():
        ref = parts.teacher(x, t, cond)
        torch.testing.assert_close(parts.generator(x, t, cond), ref)
        torch.testing.assert_close(parts.fake_score(x, t, cond), ref)
    assert parts.generator.model is not parts.teacher.model and parts.fake_score.model is not parts.generator.model


def test_gradients_flow_to_generator_only(parts) -> None:
    cond = parts.encode_prompts(["a cat", "a dog"])
    x, t = torch.randn(2, *parts.latent_shape), _t(parts, [249, 249])
    for net in (parts.generator, parts.discriminator):
        net.zero_grad(set_to_none=True)
    x0 = parts.generator.predict_x0(x, t, cond)
    images = parts.decoder(x0)
    assert images.shape == (2, 3, 64, 64)
    logits = parts.discriminator(images)
    assert logits.shape == (2,)
    (-logits.mean()).backward()
    trainable = [p for p in parts.generator.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    heads = list(parts.discriminator.heads.parameters())
    assert all(p.requires_grad and p.grad is not None for p in heads)
    frozen = [parts.teacher, parts.decoder, parts.discriminator.backbone, parts.reward, parts.extras["text_encoder"]]
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    # an optimizer over the trainable parameters holds no state for frozen parts
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    opt = torch.optim.AdamW([p for n in parts.trainable().values() for p in n.parameters() if p.requires_grad],
                            lr=0.0)  # lr 0: state is created, the shared fixture's weights do not move
    opt.step()
    assert not frozen_ids & {id(p) for p in opt.state}


def test_discriminator_resizes_and_taps(cache: Path) -> None:
    from flashdmd.nets.discriminator import PixelGANDiscriminator, SamBackbone
    from flashdmd.nets.tiny import ensure_tiny_sam

    backbone = SamBackbone.from_pretrained(ensure_tiny_sam(cache))
    assert backbone.taps == [1, 2, 3, 4]
    disc = PixelGANDiscriminator(backbone, head_width=32)
    images = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    images.retain_grad()
    disc(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # gradients pass the frozen SAM and the resize
    with pytest.raises(ValueError, match="sam_taps"):
        SamBackbone.from_pretrained(ensure_tiny_sam(cache), taps=[5])


def test_discriminator_loads_full_sam_model(tmp_path: Path) -> None:
    from transformers import SamConfig, SamModel

    from flashdmd.nets.discriminator import SamBackbone
    from flashdmd.nets.tiny import tiny_sam_config

    SamModel(SamConfig(vision_config=tiny_sam_config().to_dict())).save_pretrained(tmp_path / "sam")
    backbone = SamBackbone.from_pretrained(tmp_path / "sam", taps=[2, 4])
    feats = backbone.features(torch.zeros(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 32, 8, 8)] * 2
