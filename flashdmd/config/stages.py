"""The ``stage1`` and ``stage2`` sections: the method's own settings (spec sections 1 and 2).

Values marked [INF] are inferred defaults, not paper values (spec section 6). The range of a
student timestep depends on the family's schedule, so it is checked in cross.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashdmd.config.rules import Bound, Scope, setting

RATE = {"gt": 0.0, "le": 1.0}  # learning rates
GUIDANCE = {"ge": 0.0, "le": 100.0}


@dataclass
class Stage1Config:
    """Timestep-aware distillation (spec section 1)."""

    # dmd2: the real DMD2 baseline (spec 4: classifier head on the fake score's bottleneck, both
    # losses at every step); dmd2_pixelgan: the ablation with the Pixel-GAN in its place
    mode: Literal["flash", "dmd2", "dmd2_pixelgan"] = "flash"
    student_timesteps: list[int] = setting([999, 749, 499, 249], min_len=1, max_len=1000)  # spec 1.2
    dm_steps: list[int] = setting([])  # [] -> SNR(t) <= 1 [INF] (spec 1.3; flashdmd/algo/split.py)
    gan_steps: list[int] = setting([])  # [] -> SNR(t) > 1 [INF]
    # spec 1.4 step 4; the paper rolls out to zero (spec 6 #7); the rollout's own state costs one
    # generator forward less and matched it on the toy (bench/results/gmm_distill.md)
    gan_input: Literal["rollout_to_zero", "rollout_state"] = "rollout_state"
    ttur: int = setting(1, ge=1, le=100, why="fake-score/D updates per generator update, spec 1.6")
    fake_ema: bool = True  # Algorithm 1 line 18 (spec 1.7)
    fake_ema_decay: float = setting(0.999, ge=0, lt=1)  # [INF] spec 6 #2
    # spec 6 #20 [INF]: an EMA of the generator for evaluation and export, beside the raw weights
    # (the paper-comparable ones). Off by default: it holds one fp32 copy of the generator's
    # trainable tensors per rank's shard. It moves after every applied generator update, RL ones
    # included; stage 2 reads this section too and continues the hand-over's EMA when it has one.
    generator_ema: bool = False
    generator_ema_decay: float = setting(0.999, ge=0, lt=1)  # [INF] spec 1.7 / 6 #20
    real_guidance_scale: float = setting(8.0, **GUIDANCE)  # [INF] spec 6 #9 (DMD2 SDXL value)
    fake_guidance_scale: float = setting(1.0, **GUIDANCE)
    dmd_noise_min: float = setting(0.02, ge=0, le=1)  # DMD re-noise range as a fraction of T [INF] spec 6 #6
    dmd_noise_max: float = setting(0.98, ge=0, le=1)
    dm_weight: float = setting(1.0, ge=0, le=1e6)
    gan_weight: float = setting(5e-3, ge=0, le=1e6)  # lambda_adv [INF] spec 6 #3
    # share of the batch the GAN branch (G forward, VAE decode, SAM) runs on: a memory saver
    # 0.5 with rollout_state: planner FLOPs of sdxl-4step 1.065x real DMD2's (paper 1.075; the full
    # branch 1.45x), toy quality within seed noise of the full branch (bench/results/gmm_distill.md)
    gan_batch_fraction: float = setting(0.5, gt=0, le=1)
    gan_loss: Literal["hinge", "nonsaturating"] = "hinge"  # spec 1.8
    fake_cls_weight: float = setting(1e-2, ge=0, le=1e6)  # dmd2 mode: guidance_cls_loss weight (spec 4.2)
    generator_lr: float = setting(1e-6, **RATE)  # [INF] spec 6 #1
    fake_lr: float = setting(1e-6, **RATE)
    disc_lr: float = setting(1e-5, **RATE)
    adam_betas: list[float] = setting([0.9, 0.999], min_len=2, max_len=2, item=Bound(ge=0, lt=1))
    weight_decay: float = setting(0.01, ge=0, le=10)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = setting(500, ge=0)
    grad_clip: float = setting(10.0, gt=0, le=1e6)
    iterations: int = setting(1000, ge=1)  # total training steps (spec 6 #19: counted as DMD2 does)

    def validate(self, rules: Scope) -> None:
        steps, dm, gan = self.student_timesteps, set(self.dm_steps), set(self.gan_steps)
        flash = self.mode == "flash"
        rules.check(all(a > b for a, b in zip(steps, steps[1:])), "student_timesteps", "must be strictly decreasing",
                    "list the noisiest step first, e.g. [999, 749, 499, 249]")
        rules.check(dm <= set(steps), ("dm_steps", "student_timesteps"), "must be among stage1.student_timesteps")
        rules.check(gan <= set(steps), ("gan_steps", "student_timesteps"),
                    "must be among stage1.student_timesteps (the GAN step is a student step)")
        rules.check(not flash or not dm & gan, ("dm_steps", "gan_steps"),
                    "and stage1.gan_steps must be disjoint in flash mode (spec 1.3: never both losses on one output)")
        # flash mode, spec 1.3: every student step gets exactly one loss; a missing list is the
        # other's complement, and with both empty the SNR rule decides (checked by the preflight)
        effective_dm = dm or set(steps) - gan
        rules.check(not flash or not (dm and gan) or dm | gan >= set(steps), ("dm_steps", "gan_steps"),
                    "and stage1.gan_steps must cover every student step in flash mode (a step with neither loss "
                    "trains nothing)", "add the missing steps to one of the lists, or leave one list empty")
        rules.check(not flash or not (dm or gan) or bool(effective_dm), ("dm_steps", "gan_steps"),
                    "gives no student step the DM loss; spec 1.3 needs at least one high-noise DM step",
                    "list at least one step in stage1.dm_steps")
        rules.check(self.dmd_noise_min < self.dmd_noise_max, ("dmd_noise_min", "dmd_noise_max"),
                    "must be < stage1.dmd_noise_max (the DMD re-noise range, fractions of T)")
        # the EMA starts at the initial (teacher) weights, whose share after n updates is decay^n:
        # an EMA still mostly the teacher at the end of the run evaluates nothing that was trained
        in_limits = 0 <= self.generator_ema_decay < 1  # outside, the field limit reports it
        share = self.generator_ema_decay ** self.iterations if in_limits else 0.0
        rules.check(not self.generator_ema or share <= 0.5, ("generator_ema_decay", "iterations"),
                    f"leaves {share:.0%} of the initial weights in the generator EMA after stage1.iterations "
                    "updates (decay^iterations must be <= 0.5)",
                    "lower stage1.generator_ema_decay, e.g. 1 - 2 / stage1.iterations, or train longer")


@dataclass
class Stage2Config:
    """Joint preference RL with continuing distillation (spec section 2)."""

    init_from: str = ""  # stage-1 run directory, checkpoint step directory or export folder
    rl_transitions: list[list[int]] = setting([[999, 749], [749, 499]], item=Bound(min_len=2, max_len=2))
    num_candidates: int = setting(4, ge=2, le=256, why="K: a win/lose pair needs two candidates, spec 2.3")
    beta: float = setting(500.0, gt=0, le=1e9)  # [INF] spec 6 #14 (LPO)
    ratio_clip: float = setting(0.1, gt=0, lt=1)
    threshold: float = setting(0.6, ge=0, lt=1)  # [INF] spec 6 #13; 0 = no filtering
    rl_per_dm: int = setting(5, ge=0, le=10**6)  # RL generator updates per distillation generator update (spec 2.5)
    distill: bool = True  # False = RL only (the reward-hacking baseline)
    rl_lr: float = setting(0.0, ge=0, le=1)  # 0 -> stage1.generator_lr
    rl_batch_size: int = setting(0, ge=0, le=65536)  # prompts per RL update per rank; 0 -> data.batch_size
    warmup_steps: int = setting(0, ge=0)  # LR warm-up of the restarted stage-2 optimizers; spec 2.5 asks for none
    iterations: int = setting(2000, ge=1)

    def validate(self, rules: Scope) -> None:
        rules.check(self.distill or self.rl_per_dm >= 1, ("rl_per_dm", "distill"),
                    "must be >= 1 with stage2.distill=false (RL only: no distillation update would run)")
