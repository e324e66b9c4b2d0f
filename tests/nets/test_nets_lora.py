"""LoRA generator / fake score (spec 1.1, SD3 column): frozen base, own adapters, EMA over adapters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.engine.common import ema_update_
from flashdmd.nets.lora import trainable_named_parameters
from flashdmd.nets.registry import build_parts


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-sdxl"])
def parts(request: pytest.FixtureRequest, cache: Path):
    return build_parts(load_config(request.param, ["model.lora.enabled=true", "model.lora.rank=4",
                                                   "model.lora.alpha=4"]), cache)


def _t(parts, value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32 if parts.schedule.kind == "flow" else torch.long)


def test_only_adapters_train_and_start_at_teacher(parts) -> None:
    for net in (parts.generator, parts.fake_score):
        trainable = trainable_named_parameters(net)
        assert trainable and all("lora_" in name for name in trainable)
        total = sum(p.numel() for p in net.parameters())
        assert sum(p.numel() for p in trainable.values()) < total / 2
    assert trainable_named_parameters(parts.generator).keys() == trainable_named_parameters(parts.fake_score).keys()
    cond = parts.encode_prompts(["a cat"])
    x, t = torch.randn(1, *parts.latent_shape), _t(parts, 500)
    with torch.no_grad():
        torch.testing.assert_close(parts.generator(x, t, cond), parts.teacher(x, t, cond))
    loss = parts.generator(x, t, cond).square().mean()
    loss.backward()
    for name, p in parts.generator.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for p in trainable_named_parameters(parts.generator).values())
    parts.generator.zero_grad(set_to_none=True)


def test_adapters_are_separate_and_ema_pulls_fake_toward_generator(parts) -> None:
    gen, fake = trainable_named_parameters(parts.generator), trainable_named_parameters(parts.fake_score)
    assert all(gen[n].data_ptr() != fake[n].data_ptr() for n in gen)
    with torch.no_grad():
        for p in gen.values():
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in fake.items()}
    base_before = {n: p.detach().clone() for n, p in parts.fake_score.named_parameters() if not p.requires_grad}
    ema_update_(parts.fake_score, parts.generator, decay=0.9)
    for n, p in fake.items():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * gen[n])
    for n, p in parts.fake_score.named_parameters():  # the frozen base is untouched
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    cond = parts.encode_prompts(["a cat"])
    x, t = torch.randn(1, *parts.latent_shape), _t(parts, 500)
    with torch.no_grad():  # the generator's adapter now changes its output; the teacher's does not move
        assert not torch.allclose(parts.generator(x, t, cond), parts.teacher(x, t, cond))


def test_ema_rejects_mismatched_networks(parts) -> None:
    with pytest.raises(ValueError, match="trainable parameters differ"):
        ema_update_(parts.fake_score, parts.discriminator, decay=0.5)


def test_unknown_target_module(cache: Path) -> None:
    cfg = load_config("tiny-sd3", ["model.lora.target_modules=[to_q, not_a_layer]"])
    with pytest.raises(ValueError, match="not_a_layer"):
        build_parts(cfg, cache)
