"""FLOPs per training iteration and per network, counted on the meta device.

``torch.utils.flop_counter.FlopCounterMode`` counts one forward of each real architecture on
meta tensors for ONE sample (FLOPs are linear in the batch): denoiser, VAE decode, SAM + heads,
text encoders, the LRM's down and mid blocks. An iteration composes them the way
``flashdmd/algo/stage1.py`` and ``stage2.py`` call them (spec 1.4-1.8, 2.3-2.5):

- backward costs 2 forwards for a trainable network (input and weight gradients), 1 for a frozen
  network the gradient flows through (VAE decode, SAM: input gradients only); a checkpointed
  network runs its forward once more in backward;
- stage 1 (flash): backward simulation to the DM step (mean over the DM steps), the DM output
  with grad, the DMD target (teacher with CFG, fake score), the GAN branch on
  ``stage1.gan_batch_fraction`` of the batch (roll-out to zero, the re-noised forward with grad,
  decode, SAM); the generator is updated every ``ttur``-th iteration, the other iterations run
  the same forwards without grad; then the fake-score and discriminator turns. With
  ``gan_input=rollout_state`` the roll-out stops at the GAN step's own input state. DMD2 mode
  (spec 4.2) has no decode and no SAM: its classifier reads the fake score's bottleneck, counted
  as the forward up to the mid block (DMD2's classify mode) for the generator's fakes (frozen,
  gradient to the input) and for the fake-score turn's fakes and reals (trainable); the
  dmd2_pixelgan ablation decodes the DM output itself (no GAN-branch forward).
- stage 2: ``rl_per_dm`` RL iterations (K candidates per transition scored by the LRM, the
  reference at each state, one policy forward with grad per transition) per stage-1 iteration.

Departure: elementwise work (noise, losses, optimizer steps) is not counted; it is < 1 % here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from flashdmd.apps.plan_arch import Architecture, decode_run, denoiser_run, sam_run
from flashdmd.config import Config


@dataclass
class UnitFlops:
    """Forward FLOPs of one sample through each network."""

    denoiser: int
    decoder: int
    sam: int
    text: int
    lrm: int
    bottleneck: int  # the denoiser's forward up to its bottleneck (DMD2's classify mode)


def _count(run: object) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


class _AtBottleneck(Exception):
    """Stops a counted forward once the bottleneck module has run."""


def _count_to_bottleneck(arch: Architecture, latent: tuple[int, int, int]) -> int:
    from flashdmd.nets.dmd2_classifier import bottleneck_module

    def stop(*_: object) -> None:
        raise _AtBottleneck

    handle = bottleneck_module(arch.denoiser)[0].register_forward_hook(stop)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            try:
                denoiser_run(arch, 1, latent)()
            except _AtBottleneck:
                pass
    finally:
        handle.remove()
    return counter.get_total_flops()


def unit_flops(arch: Architecture, latent: tuple[int, int, int]) -> UnitFlops:
    """Per-sample forward FLOPs of every network of ``arch`` (meta device, cached on ``arch``)."""
    if latent in arch.flops:
        return arch.flops[latent]
    tokens = torch.zeros(1, arch.text_encoders[0].config.max_position_embeddings, dtype=torch.long, device="meta")
    text = sum(_count(lambda enc=enc: enc(tokens)) for enc in arch.text_encoders[:2])
    lrm_latent = (arch.lrm.config.in_channels, latent[1], latent[2])
    flops = UnitFlops(_count(denoiser_run(arch, 1, latent)), _count(decode_run(arch, 1, latent)),
                      _count(sam_run(arch, 1)), text, _count(denoiser_run(arch, 1, lrm_latent, arch.lrm)),
                      _count_to_bottleneck(arch, latent))
    arch.flops[latent] = flops
    return flops


def iteration_flops(cfg: Config, arch: Architecture, batch: int, latent: tuple[int, int, int],
                    stage: int = 1) -> dict[str, float]:
    """Mean FLOPs per iteration per rank, by network (see the module docstring)."""
    u, s1, e = unit_flops(arch, latent), cfg.stage1, cfg.engine
    from flashdmd.algo.split import split_steps
    from flashdmd.nets.families import get_family

    steps = list(s1.student_timesteps)
    dm, gan = split_steps(s1, get_family(cfg.model.family).schedule(cfg.model.prediction_type))
    k = sum(steps.index(t) for t in dm) / len(dm)  # mean DM step index: backward-simulation forwards
    gan_n = math.ceil(s1.gan_batch_fraction * batch)
    update = 1.0 / s1.ttur  # share of iterations that update the generator
    g_train = 3 + (1 if e.gradient_checkpointing else 0)  # forward + backward (+ recompute)
    frozen_bwd = {"decoder": 2 + (1 if e.decoder_checkpointing else 0), "sam": 2 + (1 if e.sam_checkpointing else 0)}
    flash = s1.mode == "flash" and bool(gan)
    gen = u.denoiser * batch * (k + 1 + update * (g_train - 1))
    if flash:  # the roll-out from the DM step (spec 1.4 step 4), then the re-noised forward
        ks, js = [steps.index(t) for t in dm], [steps.index(t) for t in gan]
        stop = (lambda j, i: len(steps)) if s1.gan_input == "rollout_to_zero" else (lambda j, i: max(j, i + 1))
        rollout = sum(stop(j, i) - (i + 1) for i in ks for j in js) / (len(ks) * len(js))
        gen += u.denoiser * gan_n * (rollout + 1 + update * (g_train - 1))
    cfg_passes = (2 if s1.real_guidance_scale != 1 else 1), (2 if s1.fake_guidance_scale != 1 else 1)
    decoded = gan_n if flash else batch if s1.mode == "dmd2_pixelgan" else 0
    classify = 0.0
    if s1.mode == "dmd2":  # generator's fakes (frozen: forward + input gradient), then fakes and reals
        classify = u.bottleneck * (update * batch * 2 + (batch + (cfg.data.real_batch_size or batch)) * g_train)
    out = {
        "generator": gen,
        "teacher": update * u.denoiser * batch * cfg_passes[0],
        "fake_score": u.denoiser * batch * (update * cfg_passes[1] + g_train) + classify,
        "decoder": u.decoder * decoded * (1 + update * (frozen_bwd["decoder"] - 1)),
        "discriminator": u.sam * (decoded * update * (frozen_bwd["sam"] - 1) + (decoded + batch if decoded else 0)),
        "text_encoders": u.text * batch,
    }
    if stage == 2:
        out = _with_rl(cfg, out, u, batch, g_train)
    return out


def _with_rl(cfg: Config, dm: dict[str, float], u: UnitFlops, batch: int, g_train: int) -> dict[str, float]:
    """Stage 2: per distillation iteration, ``rl_per_dm`` RL iterations; the mean per iteration."""
    s2 = cfg.stage2
    n = s2.rl_batch_size or batch
    transitions, k = len(s2.rl_transitions), s2.num_candidates
    rl = {"generator": u.denoiser * n * transitions * (1 + g_train),  # sampling + the update's forwards
          "reference": u.denoiser * n * transitions,
          "reward": (2 * u.lrm + u.text) * n * k * transitions,  # the LRM's prompt and empty-prompt branches
          "text_encoders": u.text * n}
    share = s2.rl_per_dm / (s2.rl_per_dm + (1 if s2.distill else 0)) if s2.rl_per_dm else 0.0
    names = set(dm) | set(rl)
    return {name: share * rl.get(name, 0.0) + (1 - share) * dm.get(name, 0.0) for name in names}
