"""stage1.mode=dmd2 is DMD2 (spec 4.2): a classifier head on the fake-score UNet's mid-block
features, trained with the fake score on real and fake latents, no VAE decode, no SAM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashdmd.algo.batch import Batch
from flashdmd.algo.optim import optim_specs
from flashdmd.algo.stage1 import Stage1
from flashdmd.config import load_config
from flashdmd.diffusion.rollout import randn
from flashdmd.engine.local import LocalEngine
from flashdmd.nets.dmd2_classifier import ClassifierHead
from flashdmd.nets.registry import build_parts

DMD2 = ["stage1.mode=dmd2", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage1.gan_loss=nonsaturating",
        "stage1.fake_ema=false", "stage1.ttur=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"  # the session's, shared with tests/nets/test_nets_*


def _stage1(cache: Path, *overrides: str) -> tuple[Stage1, object, LocalEngine]:
    cfg = load_config("tiny-sdxl", [*DMD2, f"model.cache_dir={cache}", *overrides])
    parts = build_parts(cfg, cache)
    engine = LocalEngine("cpu")
    engine.setup(parts.trainable(), optim_specs(cfg, 1), parts.frozen())
    return Stage1(cfg.stage1, parts, engine, cfg.seed), parts, engine


def _batch(parts, n: int = 2) -> Batch:
    cond = parts.encode_prompts(["a red car", "two dogs"][:n])
    real = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return Batch(cond, parts.null_cond(n), real, n)


@pytest.mark.slow
def test_the_classifier_losses_match_a_hand_computation(cache):
    s1, parts, _ = _stage1(cache)
    assert isinstance(parts.discriminator, ClassifierHead)  # no SAM backbone in this mode
    batch = _batch(parts)
    x0 = torch.randn(2, *parts.latent_shape, generator=torch.Generator().manual_seed(3))
    metrics: dict[str, torch.Tensor] = {}
    torch.manual_seed(11)  # the VAE encoder samples its latents from the global generator
    loss = s1.classifier.critic_loss(x0, batch, torch.Generator().manual_seed(7), metrics)
    gen_loss = s1.classifier.generator_loss(x0, batch, torch.Generator().manual_seed(7))

    # by hand: diffusion-GAN noise, the UNet's mid-block output, the head, softplus terms
    sch, unet = parts.schedule, parts.fake_score.model
    seen: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))

    def logits(x: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        t = sch.sample_t(len(x), 0.0, 1.0, g)
        x_t = sch.add_noise(x, randn(x.shape, g, like=x), t)
        parts.fake_score(x_t, t, cond)
        return parts.discriminator(seen[-1])

    g = torch.Generator().manual_seed(7)
    torch.manual_seed(11)
    real = parts.encode_images(batch.real)
    fake_logits, real_logits = logits(x0, batch.cond, g), logits(real, batch.cond, g)
    expected = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()  # guidance_cls_loss
    expected_g = F.softplus(-logits(x0, batch.cond, torch.Generator().manual_seed(7))).mean()  # gen_cls_loss
    handle.remove()
    assert seen[0].shape[1] == unet.config.block_out_channels[-1]  # the bottleneck's channels
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(gen_loss, expected_g)
    torch.testing.assert_close(metrics["d_real"], real_logits.mean())


@pytest.mark.slow
def test_an_iteration_trains_fake_score_and_head_together_without_decoding(cache):
    def run(weight: str) -> tuple[dict, dict, dict, dict, int]:
        s1, parts, engine = _stage1(cache, f"stage1.fake_cls_weight={weight}")
        decodes = []
        parts.decoder.register_forward_hook(lambda *a: decodes.append(1))
        before = {n: {k: v.clone() for k, v in engine.modules[n].state_dict().items()}
                  for n in ("generator", "fake_score", "discriminator")}
        metrics = s1.step(0, _batch(parts))
        after = {n: engine.modules[n].state_dict() for n in before}
        return metrics, before, after, {n: any(not torch.equal(before[n][k], after[n][k]) for k in before[n])
                                        for n in before}, len(decodes)

    metrics, _, with_cls, moved, decodes = run("0.01")
    assert moved == {"generator": True, "fake_score": True, "discriminator": True} and decodes == 0
    assert {"loss_dmd", "loss_gan_g", "loss_fake", "loss_d", "discriminator_lr", "fake_score_lr"} <= set(metrics)
    _, _, without_cls, _, _ = run("0.0")
    # the classifier loss reaches the fake UNet's weights (DMD2's dual role), not only the head
    assert any(not torch.equal(with_cls["fake_score"][k], without_cls["fake_score"][k]) for k in with_cls["fake_score"])
