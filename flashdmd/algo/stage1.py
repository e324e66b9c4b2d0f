"""Stage 1: one iteration of Flash-DMD's timestep-aware distillation (spec 1.4-1.10, Algorithm 1).

Per iteration, in this order (spec 1.10):

1. generator turn (every ``ttur``-th iteration; otherwise the same samples are drawn without
   gradients for the critics): a DM step tau_k drawn from (seed, step), DMD2 backward simulation
   to its input, x0_k = G(x_{tau_k}, tau_k) with the DMD loss; the GAN branch continues the
   rollout from x0_k.detach() to the clean sample (``gan_input=rollout_to_zero``) or to the GAN
   step's own input state (``rollout_state``), re-noises to t_hat, and runs G(x_hat, t_hat)
   with grad through the frozen decoder and discriminator. One optimizer step on
   L_G = dm_weight L_DMD + gan_weight L_AdvGen, then the EMA pull psi <- lam psi + (1 - lam) theta
   (Eq. 11) when ``fake_ema`` is on;
2. fake-score turn (every iteration): native denoising loss on the DM-branch outputs, t ~ U[0, T);
3. discriminator turn (every iteration): hinge (or non-saturating) loss, real pixels vs the
   decoded GAN-branch outputs; only the heads (requires_grad) are optimised.

The GAN branch runs on the first ``stage1.gan_batch_fraction`` of the batch (at least one
sample), the discriminator on the same share of the real pixels.

Uneven global batches (spec 1.9: ``data.global_batch_size`` not divisible by the world size):
every loss is a per-sample mean on its rank, and the engines average gradients over ranks, so
each is scaled by (local count x W / global count) (flashdmd/algo/shares.py): the averaged
gradient is then the mean over the whole global batch. The GAN-branch terms count the GAN
subsets of every rank. Logged losses stay the rank's plain means.

DMD2 baseline (``mode=dmd2``, spec 4): one step tau_k drawn from all student steps, both losses
on the same x0_k, TTUR as configured, and DMD2's own GAN: a classifier head on the fake score's
bottleneck features trained with the fake score (flashdmd/algo/dmd2.py); the discriminator turn
is then part of the fake-score turn. DMD2's recipe adds ``fake_ema=false ttur=5
gan_loss=nonsaturating``: every setting is honoured in every mode, so the resolved config says
what ran (``fake_ema=true`` in dmd2 mode is DMD2 plus Flash-DMD's pull, an ablation).
``mode=dmd2_pixelgan``: the same schedule of losses with the Pixel-GAN on the decoded x0_k, the
ablation that isolates the timestep-aware split from the discriminator design.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flashdmd.algo.batch import Batch
from flashdmd.algo.dmd2 import Dmd2Classifier
from flashdmd.algo.rng import control_rng, noise_generator
from flashdmd.algo.shares import mean_weight
from flashdmd.algo.split import split_steps
from flashdmd.config import Stage1Config
from flashdmd.diffusion.rollout import backward_simulate, continue_from, predict_x0, randn, renoise
from flashdmd.diffusion.sampler import cfg_predict
from flashdmd.engine.base import Engine
from flashdmd.losses import d_loss, denoising_loss, dmd_loss, g_loss
from flashdmd.nets.interfaces import take_cond
from flashdmd.nets.parts import Parts


@dataclass
class Plan:
    """This iteration's control-flow choices, identical on every rank."""

    dm_index: int  # student step index whose output gets the DM loss
    gan_index: int | None  # student step index of the GAN branch (None: no GAN step, or dmd2 mode)


@dataclass
class Weights:
    """Factors on this rank's per-sample-mean losses that make the ranks' averaged gradient the
    mean over the global batch (spec 1.9); 1.0 on an even split."""

    batch: float = 1.0  # losses over all of the rank's samples: DMD, fake score, DMD2's classifier
    gan: float = 1.0  # losses over the GAN branch's samples: Pixel-GAN generator and discriminator


@dataclass
class Samples:
    x0_dm: Tensor  # DM-branch generator outputs (detached): the fake score's training data
    fake_images: Tensor | None  # decoded GAN-branch outputs (detached): the discriminator's fakes


class Stage1:
    def __init__(self, cfg: Stage1Config, parts: Parts, engine: Engine, seed: int) -> None:
        self.cfg, self.parts, self.engine, self.seed = cfg, parts, engine, seed
        self.schedule = parts.schedule
        self.steps = list(cfg.student_timesteps)
        self.dm_steps, self.gan_steps = split_steps(cfg, self.schedule)
        self.classifier = Dmd2Classifier(cfg, parts, engine) if cfg.mode == "dmd2" else None
        # networks that pass the generator's gradient through but learn nothing from it
        self.critics = ("fake_score", "discriminator") if self.classifier else ("discriminator",)

    # -- control flow ---------------------------------------------------------------------------
    def plan(self, step: int) -> Plan:
        rng = control_rng(self.seed, step, "stage1")
        dm_index = self.steps.index(rng.choice(self.dm_steps))
        if self.cfg.mode != "flash" or not self.gan_steps:
            return Plan(dm_index, None)
        return Plan(dm_index, self.steps.index(rng.choice(self.gan_steps)))

    def step(self, step: int, batch: Batch) -> dict[str, float]:
        """One stage-1 iteration; the generator is updated every ``ttur``-th step (spec 1.6)."""
        return self.iteration(step, batch, update_generator=step % self.cfg.ttur == 0)

    def iteration(self, step: int, batch: Batch, update_generator: bool) -> dict[str, float]:
        """Generator turn (with or without an update), then the fake-score and discriminator turns."""
        plan = self.plan(step)
        weights = self.loss_weights(batch)
        gen = noise_generator(self.seed, step, self.engine.rank, self.engine.device, "stage1")
        metrics: dict[str, Tensor] = {}
        floats: dict[str, float] = {}
        if update_generator:
            with self.engine.frozen(*self.critics):
                samples, loss_g = self._generator_losses(plan, batch, gen, metrics, weights)
                self.engine.backward("generator", loss_g)
            floats.update(prefixed("generator", self.engine.step("generator")))
            self.pull_fake_score()
        else:
            with torch.no_grad():
                samples = self._generator_samples(plan, batch, gen)
        floats.update(self._fake_score_turn(samples.x0_dm, batch, gen, metrics, weights))
        if samples.fake_images is not None:
            floats.update(prefixed("discriminator",
                                   self._discriminator_turn(samples.fake_images, batch, metrics, weights)))
        return {**dict(zip(metrics, torch.stack([v.detach().float() for v in metrics.values()]).tolist())), **floats}

    def gan_count(self, n: int) -> int:
        """How many of a rank's ``n`` samples the Pixel-GAN terms see (dmd2_pixelgan: all of them)."""
        return gan_share(self.cfg.gan_batch_fraction, n) if self.cfg.mode == "flash" else n

    def loss_weights(self, batch: Batch) -> Weights:
        """This rank's loss factors from every rank's batch share (spec 1.9, flashdmd/algo/shares.py)."""
        if not batch.shares:
            return Weights()
        rank = self.engine.rank
        if (len(batch.shares) != self.engine.world_size or batch.shares[rank] != batch.size
                or len(batch.real) != batch.size):
            raise ValueError(f"batch shares {list(batch.shares)} do not describe rank {rank} of "
                             f"{self.engine.world_size} with {batch.size} prompts and {len(batch.real)} real images")
        return Weights(mean_weight(batch.shares, rank), mean_weight([self.gan_count(n) for n in batch.shares], rank))

    def pull_fake_score(self) -> None:
        """psi <- lam psi + (1 - lam) theta (Eq. 11, spec 1.7) after each generator update, with
        ``fake_ema`` on (DMD2's recipe turns it off)."""
        if self.cfg.fake_ema:
            self.engine.ema_("fake_score", "generator", self.cfg.fake_ema_decay)

    # -- generator ----------------------------------------------------------------------------
    def _dm_output(self, plan: Plan, batch: Batch, gen: torch.Generator) -> Tensor:
        """x0 at the DM step from a backward-simulated input (spec 1.4 steps 2-3); grad if enabled."""
        G = self.engine["generator"]
        z = randn((batch.size, *self.parts.latent_shape), gen, device=self.engine.device)
        x_k = backward_simulate(G, self.schedule, z, self.steps, plan.dm_index, batch.cond, gen)
        return predict_x0(G, self.schedule, x_k, self.steps[plan.dm_index], batch.cond)

    def _gan_output(self, plan: Plan, x0_dm: Tensor, batch: Batch, gen: torch.Generator) -> Tensor:
        """G(x_hat, t_hat) on an inference-like input (spec 1.4 step 4); grad if enabled.

        Runs on the first ``gan_share(n)`` samples only: the branch's no-grad rollout, its second
        generator forward and backward, the decode and the discriminator are its cost, and with
        a share below 1 the Pixel-GAN term is estimated on fewer samples (an unbiased mean)."""
        G = self.engine["generator"]
        j = plan.gan_index
        m = gan_share(self.cfg.gan_batch_fraction, batch.size)
        cond = take_cond(batch.cond, slice(0, m))
        if self.cfg.gan_input == "rollout_to_zero":
            stop = len(self.steps)  # x_0 = Detach(B(x_{t1}, 0)), then forward diffusion to t_hat
        else:
            stop = max(j, plan.dm_index + 1)  # the rollout's own state at t_hat
        x0_src = continue_from(G, self.schedule, x0_dm[:m].detach(), self.steps, plan.dm_index, stop, cond, gen)
        x_hat = renoise(self.schedule, x0_src, self.steps[j], gen)
        return predict_x0(G, self.schedule, x_hat, self.steps[j], cond)

    def _generator_samples(self, plan: Plan, batch: Batch, gen: torch.Generator) -> Samples:
        x0_dm = self._dm_output(plan, batch, gen)
        if self.cfg.mode == "dmd2_pixelgan":
            return Samples(x0_dm.detach(), self.engine["decoder"](x0_dm).detach())
        if plan.gan_index is None:
            return Samples(x0_dm.detach(), None)
        x0_gan = self._gan_output(plan, x0_dm, batch, gen)
        return Samples(x0_dm.detach(), self.engine["decoder"](x0_gan).detach())

    def _generator_losses(self, plan: Plan, batch: Batch, gen: torch.Generator, metrics: dict[str, Tensor],
                          weights: Weights) -> tuple[Samples, Tensor]:
        """L_G = dm_weight L_DMD + gan_weight L_AdvGen (Algorithm 1 line 16), each term weighted
        for the global batch (spec 1.9)."""
        x0_dm = self._dm_output(plan, batch, gen)
        metrics["loss_dmd"] = loss_dmd = self._dmd_loss(x0_dm, batch, gen)
        loss = self.cfg.dm_weight * weights.batch * loss_dmd
        if self.classifier is not None:
            metrics["loss_gan_g"] = loss_adv = self.classifier.generator_loss(x0_dm, batch, gen)
            return Samples(x0_dm.detach(), None), loss + self.cfg.gan_weight * weights.batch * loss_adv
        if self.cfg.mode == "dmd2_pixelgan":
            x0_gan = x0_dm  # the baseline: both losses on the same output
        elif plan.gan_index is not None:
            x0_gan = self._gan_output(plan, x0_dm, batch, gen)
        else:
            return Samples(x0_dm.detach(), None), loss
        images = self.engine["decoder"](x0_gan)
        metrics["loss_gan_g"] = loss_adv = g_loss(self.cfg.gan_loss, self.engine["discriminator"](images))
        return Samples(x0_dm.detach(), images.detach()), loss + self.cfg.gan_weight * weights.gan * loss_adv

    def _dmd_loss(self, x0: Tensor, batch: Batch, gen: torch.Generator) -> Tensor:
        """Spec 1.5: re-noise at t ~ U[min, max] of T, real score with CFG, fake score without."""
        cfg, sch = self.cfg, self.schedule
        t = sch.sample_t(batch.size, cfg.dmd_noise_min, cfg.dmd_noise_max, gen, device=x0.device)
        with torch.no_grad():
            x_t = sch.add_noise(x0.detach(), randn(x0.shape, gen, like=x0), t)
            pred_fake = cfg_predict(self.engine["fake_score"], x_t, t, batch.cond, batch.uncond,
                                    cfg.fake_guidance_scale)
            pred_real = cfg_predict(self.engine["teacher"], x_t, t, batch.cond, batch.uncond,
                                    cfg.real_guidance_scale)
            x0_fake = sch.to_x0(pred_fake.double(), x_t.double(), t)  # fp64 as in DMD2
            x0_real = sch.to_x0(pred_real.double(), x_t.double(), t)
        return dmd_loss(x0, x0_real, x0_fake)

    # -- critics ------------------------------------------------------------------------------
    def _fake_score_turn(self, x0: Tensor, batch: Batch, gen: torch.Generator, metrics: dict[str, Tensor],
                         weights: Weights) -> dict[str, float]:
        """Spec 1.6: plain denoising loss in the native parameterisation, t ~ U[0, T), no CFG."""
        sch = self.schedule
        t = sch.sample_t(batch.size, 0.0, 1.0, gen, device=x0.device)
        noise = randn(x0.shape, gen, like=x0)
        pred = self.engine["fake_score"](sch.add_noise(x0, noise, t), t, batch.cond)
        metrics["loss_fake"] = loss = denoising_loss(pred, sch.target(x0, noise, t))
        if self.classifier is None:
            self.engine.backward("fake_score", weights.batch * loss)
            return prefixed("fake_score", self.engine.step("fake_score"))
        # DMD2: the classifier loss trains the fake score and the head in one backward (spec 4.2);
        # its real and fake terms are means over all of the rank's samples, as the denoising loss
        loss = loss + self.cfg.fake_cls_weight * self.classifier.critic_loss(x0, batch, gen, metrics)
        self.engine.backward("fake_score", weights.batch * loss)
        return {**prefixed("fake_score", self.engine.step("fake_score")),
                **prefixed("discriminator", self.engine.step("discriminator"))}

    def _discriminator_turn(self, fake_images: Tensor, batch: Batch, metrics: dict[str, Tensor],
                            weights: Weights) -> dict[str, float]:
        """Spec 1.8: L_D on real pixels vs decoded generator outputs (heads only are trainable);
        both terms count the GAN subset, so one weight covers them (spec 1.9)."""
        D = self.engine["discriminator"]
        real = batch.real[:gan_share(len(fake_images) / batch.size, len(batch.real))]  # the fakes' share
        real_logits, fake_logits = D(real), D(fake_images)
        metrics["loss_d"] = loss = d_loss(self.cfg.gan_loss, real_logits, fake_logits)
        metrics["d_real"], metrics["d_fake"] = real_logits.mean(), fake_logits.mean()
        self.engine.backward("discriminator", weights.gan * loss)
        return self.engine.step("discriminator")


def gan_share(fraction: float, n: int) -> int:
    """How many of ``n`` samples the GAN branch runs on (``stage1.gan_batch_fraction``), at least one."""
    return max(1, math.ceil(fraction * n - 1e-9))


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in values.items()}
