"""DMD2's GAN classifier turns inside Stage 1 (``stage1.mode=dmd2``, spec 4.2).

The classifier (flashdmd/nets/dmd2_classifier.py) is a head on the fake score's bottleneck
features, registered in the engine as the trainable network "discriminator" and trained with the
fake score's loss (DMD2's guidance model holds both):

- classify(x0): diffusion GAN, x_t = add_noise(x0, eps, t) with t ~ U[0, T) (DMD2's
  ``diffusion_gan`` with max timestep 1000), one fake-score forward, the head on the bottleneck;
- generator: gen_cls_loss = g_loss(D(classify(x0_k))), weighted ``stage1.gan_weight`` (DMD2 SDXL:
  5e-3), on the same x0_k as the DMD loss, gradients through the frozen fake score and head;
- fake score + head: guidance_cls_loss = d_loss(D(real), D(fake)) weighted
  ``stage1.fake_cls_weight`` (DMD2 SDXL: 1e-2), added to the denoising loss, one backward, then
  both optimizers step. Real inputs are latents: ``Parts.encode_images`` of the batch's real
  pixels (the VAE encoder; DMD2 reads precomputed latents). No VAE decode, no SAM.

DMD2 uses the non-saturating (softplus) form: the baseline recipe sets
``stage1.gan_loss=nonsaturating`` (with ``ttur=5`` and ``fake_ema=false``, spec 4.1); the config
value is what runs. Departure: real latents are classified under the generator prompts' text
conditioning (rows reused cyclically), as the batch carries no captions of the real images.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashdmd.algo.batch import Batch
from flashdmd.config import Stage1Config
from flashdmd.diffusion.rollout import randn
from flashdmd.engine.base import Engine
from flashdmd.losses import d_loss, g_loss
from flashdmd.nets.dmd2_classifier import BottleneckTap
from flashdmd.nets.interfaces import Conditioning, take_cond
from flashdmd.nets.parts import Parts


class Dmd2Classifier:
    def __init__(self, cfg: Stage1Config, parts: Parts, engine: Engine) -> None:
        if parts.encode_images is None:
            raise ValueError(f"stage1.mode=dmd2 needs real latents, but family {parts.family!r} has no image "
                             f"encoder (Parts.encode_images); use stage1.mode=dmd2_pixelgan")
        self.cfg, self.parts, self.engine = cfg, parts, engine
        # on the module the engine runs (a sharded engine may have rebuilt a meta-built fake score)
        self.tap = BottleneckTap(engine.raw("fake_score"))

    def logits(self, x0: Tensor, cond: Conditioning, gen: torch.Generator) -> Tensor:
        """D(x0): the head on the fake score's bottleneck at a diffusion-GAN noise level."""
        sch = self.parts.schedule
        t = sch.sample_t(len(x0), 0.0, 1.0, gen, device=x0.device)
        x_t = sch.add_noise(x0, randn(x0.shape, gen, like=x0), t)
        with self.tap.capture() as tap:
            self.engine["fake_score"](x_t, t, cond)
        return self.engine["discriminator"](tap.features)

    def generator_loss(self, x0: Tensor, batch: Batch, gen: torch.Generator) -> Tensor:
        """gen_cls_loss (spec 4.2); call with the fake score and the head frozen."""
        return g_loss(self.cfg.gan_loss, self.logits(x0, batch.cond, gen))

    def critic_loss(self, x0_fake: Tensor, batch: Batch, gen: torch.Generator,
                    metrics: dict[str, Tensor]) -> Tensor:
        """guidance_cls_loss (spec 4.2) on detached generator outputs and real latents."""
        with torch.no_grad():
            real = self.parts.encode_images(batch.real).to(x0_fake.dtype)
        real_cond = take_cond(batch.cond, torch.arange(len(real)) % batch.size) if batch.cond else batch.cond
        fake_logits = self.logits(x0_fake.detach(), batch.cond, gen)
        real_logits = self.logits(real, real_cond, gen)
        metrics["d_real"], metrics["d_fake"] = real_logits.mean(), fake_logits.mean()
        metrics["loss_d"] = loss = d_loss(self.cfg.gan_loss, real_logits, fake_logits)
        return loss
