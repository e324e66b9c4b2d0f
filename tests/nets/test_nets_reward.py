"""Latent reward model (spec 3.1): VFE at gs = 1, head round trip, LPO layout, score shapes."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from flashdmd.nets.families import get_family
from flashdmd.nets.reward import LatentRewardModel
from flashdmd.nets.tiny import ensure_tiny_lrm, ensure_tiny_teacher


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd15"])
def lrm(request: pytest.FixtureRequest, cache: Path) -> tuple[LatentRewardModel, Path]:
    family = get_family(request.param)
    teacher = ensure_tiny_teacher(family, cache)
    folder = ensure_tiny_lrm(family, teacher, cache)
    return LatentRewardModel.load(folder, teacher, trim=False).eval(), teacher  # full UNet: compared below


def _plain_conditional_features(model: LatentRewardModel, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """Pooled features of the FULL diffusers UNet forward on the prompt only, captured by hooks."""
    unet, captured = model.unet, {}
    handles = [unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o))]
    for b, block in enumerate(unet.down_blocks):
        last = block.attentions[-1] if getattr(block, "attentions", None) else block.resnets[-1]
        handles.append(last.register_forward_hook(
            lambda m, i, o, b=b: captured.__setitem__(b, o[0] if isinstance(o, tuple) else getattr(o, "sample", o))))
    context, pooled, _ = model._encode(cond)
    added = None
    if pooled is not None:
        r = model.resolution
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * len(x), dtype=torch.float32)}
    unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)
    for h in handles:
        h.remove()
    feats = [captured[b].mean(dim=(2, 3)) for b in range(len(unet.down_blocks))] + [captured["mid"].mean(dim=(2, 3))]
    return torch.cat(feats, dim=-1)


def test_gs_one_equals_plain_conditional_features(lrm) -> None:
    model, _ = lrm
    prompts = ["a cat", "a sunny beach"]
    cond = model.tokenize(prompts)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 100])
    with torch.no_grad():
        feats = model.pooled_features(x, t, cond, guidance_scale=1.0)
        plain = _plain_conditional_features(model, x, t, cond)
        torch.testing.assert_close(feats, plain, atol=1e-5, rtol=1e-5)
        assert feats.shape == (2, model.feature_dim)
        # gs != 1 moves only the mid-block part (VFE), never the down-block features
        enhanced = model.pooled_features(x, t, cond, guidance_scale=7.5)
        mid = model.unet.config.block_out_channels[-1]
        torch.testing.assert_close(enhanced[:, :-mid], feats[:, :-mid])
        assert not torch.allclose(enhanced[:, -mid:], feats[:, -mid:])


def test_scores_shape_and_definition(lrm) -> None:
    model, _ = lrm
    cond = model.tokenize(["a cat", "a dog", "a car"])
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 749, 499])
    with torch.no_grad():
        scores = model(x, t, cond)
        v, txt = model.image_features(x, t, cond), model.text_features(cond)
    assert scores.shape == (3,)
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(v, txt, dim=-1)
    torch.testing.assert_close(scores, expected)
    assert scores.abs().max() <= model.logit_scale.exp() + 1e-4


def test_trimmed_lrm_scores_the_same_without_up_blocks(lrm) -> None:
    """The LRM is built only from the blocks it runs: same scores, fewer parameters, no save."""
    model, _ = lrm
    trimmed = copy.deepcopy(model).trim()
    assert sum(p.numel() for p in trimmed.parameters()) < sum(p.numel() for p in model.parameters())
    assert len(trimmed.unet.up_blocks) == 0
    cond = model.tokenize(["a cat", "a dog"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    with torch.no_grad():
        assert torch.equal(trimmed(x, t, cond), model(x, t, cond))
    with pytest.raises(ValueError, match="trimmed"):
        trimmed.save(Path("unused"))


def test_temperature_and_projection_round_trip(lrm, tmp_path: Path) -> None:
    model, teacher = lrm
    with torch.no_grad():
        model.logit_scale.fill_(1.234)
        model.visual_projection.weight.normal_()
    model.save(tmp_path / "lrm")
    loaded = LatentRewardModel.load(tmp_path / "lrm", teacher).eval()
    assert loaded.logit_scale.item() == pytest.approx(1.234)
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)
    cond = model.tokenize(["a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond))


def test_loads_lpo_layout(lrm, tmp_path: Path) -> None:
    """LPO saves unet/, text encoders and a state_dict.pt; tokenizers come from the base folder."""
    model, teacher = lrm
    folder = tmp_path / "lpo"
    model.unet.save_pretrained(folder / "unet")
    for i, enc in enumerate(model.text_encoders):
        enc.save_pretrained(folder / ("text_encoder" + (f"_{i + 1}" if i else "")))
    state = {"visual_projection": model.visual_projection.state_dict(), "logit_scale": 2.5}
    if model.text_projection is not None:
        state["text_projection"] = model.text_projection.state_dict()
    torch.save(state, folder / "state_dict.pt")
    loaded = LatentRewardModel.load(folder, teacher, style=model.style, resolution=model.resolution)
    assert loaded.logit_scale.item() == pytest.approx(2.5)
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)
    with pytest.raises(ValueError, match="no lrm.json"):
        LatentRewardModel.load(folder, teacher)


def test_bad_lrm_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no unet/"):
        LatentRewardModel.load(tmp_path)
