"""The ``engine`` and ``health`` sections: how the networks are sharded and run, and what a
non-finite step or a drifting run does (flashdmd/engine/, flashdmd/train/guard.py, health.py)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from flashdmd.config.rules import Scope, setting

SHARDING_ENGINES = ("fsdp", "deepspeed")  # the engines that shard parameters, offload and shard the teacher
BOUND = {"ge": 0.0, "why": "0 = no bound"}  # a health monitor's warning bound


@dataclass
class EngineConfig:
    kind: Literal["local", "fsdp", "deepspeed"] = "local"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype; masters stay fp32
    gradient_checkpointing: bool = False  # generator and fake score recompute their blocks in backward
    decoder_checkpointing: bool = False  # the VAE decoder's blocks recomputed in backward (the GAN branch's decode)
    # > 0: the differentiable decode runs, and is recomputed, this many samples at a time
    decode_micro_batch: int = setting(0, ge=0, le=65536)
    sam_checkpointing: bool = False  # SAM encoder layers recomputed in backward (the Pixel-GAN, spec 1.8)
    offload_optimizer: bool = False
    offload_params: bool = False
    teacher_sharding: Literal["replicate", "zero3"] = "replicate"
    collective_timeout_s: int = setting(600, ge=1, le=7 * 86400)
    # deepspeed: also write DeepSpeed's own layout (latest, *_model_states.pt, *_optim_states.pt) into each
    # step directory, for zero_to_fp32 and ds_to_universal; doubles a step's size, flashdmd never reads it
    deepspeed_layout: bool = True

    def validate(self, rules: Scope) -> None:
        sharded = self.kind in SHARDING_ENGINES
        for name in ("offload_optimizer", "offload_params"):
            rules.check(sharded or not getattr(self, name), (name, "kind"),
                        "needs engine.kind deepspeed or fsdp (the local engine keeps everything on the device)")
        rules.check(sharded or self.teacher_sharding == "replicate", ("teacher_sharding", "kind"),
                    "must be replicate with engine.kind=local (only deepspeed and fsdp shard the teacher)")


@dataclass
class HealthConfig:
    """Training health: non-finite steps and monitor bounds (flashdmd/train/guard.py, health.py)."""

    max_consecutive_nonfinite: int = setting(3, ge=1, le=10**6)  # this many non-finite steps in a row trigger on_nonfinite
    on_nonfinite: Literal["rollback", "stop"] = "rollback"  # back to the last valid checkpoint, or stop the run
    rollback_lr_factor: float = setting(0.5, gt=0, lt=1)  # every learning rate is multiplied by this at each rollback
    max_rollbacks: int = setting(2, ge=0, le=10**6)  # past this many rollbacks the run stops
    monitors: bool = True  # health/* metrics at every tracking.log_every step
    monitor_batch: int = setting(8, ge=2, le=65536)  # generator samples per monitor measurement
    fake_lag_max: float = setting(0.0, **BOUND)  # warn above: fake-score denoising loss on fresh generator samples
    dm_grad_norm_max: float = setting(0.0, **BOUND)  # warn above: generator gradient norm at a DM step
    d_logit_gap_max: float = setting(0.0, **BOUND)  # warn above: |mean D(real) - mean D(fake)|
    latent_drift_max: float = setting(0.0, **BOUND)  # warn above: |mean - mean_0| or |std / std_0 - 1| of generator samples
    diversity_min: float = setting(0.0, **BOUND)  # stage 2, warn below: mean pairwise distance of samples for one prompt

    def validate(self, rules: Scope) -> None:
        bounds = [f.name for f in fields(self) if f.name.endswith(("_max", "_min")) and getattr(self, f.name)]
        rules.check(self.monitors or not bounds, (*(bounds or ["monitors"]), "monitors"),
                    "is only read with health.monitors=true", "set health.monitors=true or the bound to 0")
