"""Memory and FLOP planner: per-GPU bytes, host bytes per node and FLOPs of a Flash-DMD run
before it is submitted.

``plan(cfg, world_size)`` counts every parameter of the family's real architectures on the meta
device (``flashdmd.apps.plan_arch``) and models, per GPU:

- trainable networks (generator, fake score, discriminator): fp32 masters (the registry keeps
  them fp32; with LoRA the frozen base lives inside the student too), one gradient per trainable
  parameter, AdamW two moments. local/DDP hold full replicas; FSDP2 shards everything (4 B
  params, 4 B grads, 8 B moments, / world); ZeRO-3 keeps compute-dtype parameter and gradient
  partitions plus the fp32 master and moments (12 B). The discriminator's frozen SAM backbone
  lives inside it and is sharded with it.
- frozen networks in ``model.dtype``: teacher (sharded with ``engine.teacher_sharding=zero3``),
  VAE, text encoders, the LRM as ``flashdmd.nets.reward`` holds it (down and mid blocks plus its
  own text encoders; stage 2, or whenever ``model.reward_model`` is set or the family is tiny)
  and, in stage 2, the reference policy in the compute dtype (sharded like the teacher).
- sharded engines' working set: FSDP2 gathers a whole block (current + prefetched); ZeRO-3 holds
  at most ``stage3_max_live_parameters`` (default 1e9) gathered parameters.
- activations: the saved-tensor bytes of ``plan_arch.per_sample`` times the batch, in the
  compute dtype, with every saver the config switches on: generator/fake-score checkpointing
  (``engine.gradient_checkpointing``), VAE decoder checkpointing and micro-batches
  (``engine.decoder_checkpointing``, ``engine.decode_micro_batch``), SAM checkpointing in
  training mode (``engine.sam_checkpointing``), and the GAN branch on
  ``stage1.gan_batch_fraction`` of the batch. A stage-1 generator turn holds the DM-branch and
  GAN-branch forwards (one in DMD2 mode), one decode and one SAM + heads forward, plus the
  largest recomputed unit in backward; a stage-2 RL turn holds one policy forward per
  transition. The larger turn is the peak. Transient no-grad forwards (teacher with CFG,
  candidate scoring), the CUDA context and fragmentation are not modelled: ``--reserve`` GiB are
  kept free for them.
- the generator EMA (``stage1.generator_ema``, spec 6 #20): one fp32 copy of the generator's
  trainable tensors, held like its parameters (replicated, FSDP2 shards, or pieces of the ZeRO-3
  fp32 masters, on the host where those are offloaded).
- the batch: ``data.global_batch_size`` split over the GPUs when set (spec 1.9; the first
  B % W GPUs take one sample more, flashdmd/algo/shares.py), else ``data.batch_size`` per GPU.
  Memory and FLOPs are those of the largest share, the GPU that peaks.

Host memory per node at start-up: each rank's process reads the frozen networks whole
(from_pretrained, then moved to its GPU), except the teacher and the stage-2 reference with
``engine.teacher_sharding=zero3``, which a sharded engine fills shard by shard; sharded engines
build the students on the meta device and read only their shard, from the teacher folder in
stage 1 and from the hand-over in stage 2 (``flashdmd.nets.lazy``, ``flashdmd.train.handoff``);
the local engine holds two fp32 students (and in stage 2 a copy of the generator as the
reference); offloaded states stay on the host.
FLOPs per iteration per network come from ``plan_flops`` (FlopCounterMode on the meta device),
with the Flash-DMD / DMD2 ratio of the same preset. ``tests/apps/test_planner.py`` checks the
rows against the real engines and the activations against measured tiny runs.

    python -m flashdmd.planner --config sdxl-4step --nodes 4 [--gpus-per-node 8] [--gpu-mem 80] [--stage 2]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from flashdmd.apps.plan_arch import GIB, Architecture, architecture, count, largest_block, lora_count, per_sample
from flashdmd.apps.plan_flops import iteration_flops
from flashdmd.config import Config, ConfigError, apply_override, load_config, validate

__all__ = ["GIB", "Architecture", "Plan", "Row", "architecture", "cli", "count", "lora_count", "plan", "render"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DS_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters (flashdmd keeps it)


@dataclass
class Row:
    network: str
    params: int  # bytes per GPU
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    host: int = 0  # bytes in host memory (offloaded states), per GPU's process

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass
class Plan:
    family: str
    engine: str
    world_size: int
    gpu_mem_gib: float
    reserve_gib: float
    rows: list[Row]
    counts: dict[str, tuple[int, int]]  # network -> (parameters, trainable parameters)
    settings: dict[str, Any]
    global_batch: int = 0
    shares: list[int] = field(default_factory=list)  # every GPU's batch (spec 1.9); ranks differ by at most one
    host_startup: int = 0  # bytes per rank's process at start-up (before the frozen nets move to the GPU)
    gpus_per_node: int = 8
    flops: dict[str, float] = field(default_factory=dict)  # network -> FLOPs per iteration per GPU
    flops_ratio: float = 0.0  # this preset's FLOPs per iteration / the same preset in DMD2 mode
    suggestion: str = ""

    @property
    def gpu_bytes(self) -> int:
        return sum(r.gpu for r in self.rows)

    @property
    def host_node_bytes(self) -> int:
        return self.gpus_per_node * self.host_startup

    @property
    def fits(self) -> bool:
        return self.gpu_bytes + self.reserve_gib * GIB <= self.gpu_mem_gib * GIB

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.network == name)


def _trainable_row(name: str, total: int, trainable: int, cfg: Config, world: int, host_optimizer: bool,
                   host_params: bool, frozen_bytes: int = 4, frozen_total: int = 0) -> Row:
    """One trainable network: ``total`` fp32 parameters of which ``trainable`` get grads and AdamW,
    plus ``frozen_total`` frozen ones at ``frozen_bytes`` (the SAM backbone inside the discriminator)."""
    e, compute = cfg.engine, DTYPE_BYTES[cfg.engine.precision]
    if e.kind == "local":
        return Row(name, 4 * total + frozen_bytes * frozen_total, 4 * trainable, 8 * trainable)
    if e.kind == "fsdp":  # fp32 shards of everything; the offload policy moves all of it to the host
        row = Row(name, (4 * total + frozen_bytes * frozen_total) // world, 4 * trainable // world,
                  8 * trainable // world)
        if e.offload_params or e.offload_optimizer:
            row.host, row.params, row.grads, row.optimizer = row.params + row.grads + row.optimizer, 0, 0, 0
        return row
    # ZeRO-3: compute-dtype partitions of parameters and gradients, fp32 master + two moments
    row = Row(name, (compute * total + frozen_bytes * frozen_total) // world, compute * trainable // world,
              12 * trainable // world)
    if host_optimizer:
        row.host += row.optimizer + row.grads
        row.optimizer = row.grads = 0
    if host_params:
        row.host += row.params
        row.params = 0
    return row


@dataclass
class Turn:
    """Saved activations of one turn, bytes in the compute dtype."""

    rows: list[Row]
    name: str

    @property
    def total(self) -> int:
        return sum(r.activations for r in self.rows)


def _stage1_turn(cfg: Config, arch: Architecture, batch: int, scale: float) -> Turn:
    """The generator turn of stage 1 (spec 1.4-1.8): DM and GAN branches, decode, SAM + heads."""
    from flashdmd.nets.families import get_family

    e, s1 = cfg.engine, cfg.stage1
    one = per_sample(arch, cfg.data.resolution, get_family(cfg.model.family).latent_shape(cfg.data.resolution))
    gan_n = math.ceil(s1.gan_batch_fraction * batch)
    flash = s1.mode == "flash"
    gen_one = one.generator_gc if e.gradient_checkpointing else one.generator
    gen = gen_one * (batch + (gan_n if flash else 0))
    units = [one.generator_gc_unit * batch if e.gradient_checkpointing else 0]
    if e.decoder_checkpointing and e.decode_micro_batch > 0:  # chunks keep their latents; one recomputed at a time
        dec = one.latent * gan_n
        units.append(min(e.decode_micro_batch, gan_n) * (one.decoder_gc + one.decoder_gc_unit))
    elif e.decoder_checkpointing:
        dec = one.decoder_gc * gan_n
        units.append(one.decoder_gc_unit * gan_n)
    else:
        dec = one.decoder * gan_n
    sam = (one.sam_gc if e.sam_checkpointing else one.sam) * gan_n
    units.append(one.sam_gc_unit * gan_n if e.sam_checkpointing else 0)
    chunk = min(e.decode_micro_batch, gan_n) if e.decode_micro_batch > 0 else gan_n
    buffers = 2 * max(one.largest["generator"] * batch, one.largest["decoder"] * chunk, one.largest["sam"] * gan_n)
    branches = 2 if flash else 1
    rows = [Row(f"act: generator x{branches}", 0, activations=int(scale * gen)),
            Row("act: VAE decode", 0, activations=int(scale * dec)),
            Row("act: SAM + heads", 0, activations=int(scale * sam)),
            Row("act: recompute + grads", 0, activations=int(scale * (max(units) + buffers)))]
    return Turn(rows, "stage-1 generator turn")


def _rl_turn(cfg: Config, arch: Architecture, batch: int, scale: float) -> Turn:
    """The stage-2 RL update (spec 2.3-2.4): one policy forward with grad per transition."""
    from flashdmd.nets.families import get_family

    e, s2 = cfg.engine, cfg.stage2
    one = per_sample(arch, cfg.data.resolution, get_family(cfg.model.family).latent_shape(cfg.data.resolution))
    n, transitions = s2.rl_batch_size or batch, len(s2.rl_transitions)
    gen = (one.generator_gc if e.gradient_checkpointing else one.generator) * n * transitions
    unit = (one.generator_gc_unit if e.gradient_checkpointing else 0) + 2 * one.largest["generator"]
    return Turn([Row(f"act: policy x{transitions}", 0, activations=int(scale * gen)),
                 Row("act: recompute + grads", 0, activations=int(scale * unit * n))], "stage-2 RL turn")


def _reward_present(cfg: Config, arch: Architecture, stage: int) -> bool:
    """The registry builds the LRM for tiny families and whenever model.reward_model is set; stage 2 needs it."""
    return stage == 2 or arch.tiny or bool(cfg.model.reward_model)


def _host_startup(cfg: Config, arch: Architecture, stage: int, rows: list[Row], n_student: int) -> int:
    """Bytes one rank's process holds on the host at its start-up peak (see the module docstring)."""
    frozen_b = DTYPE_BYTES[cfg.model.dtype]
    n_text = sum(count(t) for t in arch.text_encoders)
    # sharded engines fill the students (both stages, from the hand-over in stage 2) and, with
    # teacher_sharding=zero3, the teacher and the reference shard by shard on the device (nets/lazy.py)
    lazy = cfg.engine.kind != "local"
    frozen_sharded = lazy and cfg.engine.teacher_sharding == "zero3"
    teacher = 0 if frozen_sharded else count(arch.denoiser)
    total = frozen_b * (teacher + count(arch.vae) + n_text + count(arch.sam))
    if _reward_present(cfg, arch, stage):  # read whole, trimmed once loaded
        total += frozen_b * (count(arch.denoiser) + n_text)
    if not lazy:
        total += 2 * 4 * n_student  # the two fp32 students, whole
    if stage == 2 and not frozen_sharded:  # the reference, whole: an fp32 copy of the generator, or read
        total += (4 if not lazy else DTYPE_BYTES[cfg.engine.precision]) * n_student  # in the compute dtype
    return total + sum(r.host for r in rows)


def per_gpu_batch(cfg: Config, world_size: int) -> int:
    """The largest per-GPU batch of the run (``data.global_batch_size`` split, else ``data.batch_size``):
    the share the memory plan must fit (spec 1.9)."""
    return max(cfg.data.shares(world_size))


def _ema_row(cfg: Config, trainable: int, world: int) -> Row:
    """The generator EMA (spec 6 #20): fp32 copies of the trainable tensors, laid out like the
    parameters' fp32 copies of each engine (flashdmd/engine/shadow.py)."""
    e = cfg.engine
    if e.kind == "local":
        return Row("generator EMA", 4 * trainable)
    row = Row("generator EMA", 4 * trainable // world)
    # FSDP2 offload moves the parameter shards to the host; ZeRO-3 keeps the fp32 masters there
    # with the optimizer offloaded, and the EMA pieces sit beside them
    if e.offload_optimizer if e.kind == "deepspeed" else (e.offload_params or e.offload_optimizer):
        row.host, row.params = row.params, 0
    return row


def plan(cfg: Config, world_size: int, stage: int = 1, gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0,
         arch: Architecture | None = None, with_activations: bool = True, suggest: bool = True,
         gpus_per_node: int = 8, with_flops: bool = True) -> Plan:
    """Per-GPU memory, host memory and FLOPs of ``cfg`` on ``world_size`` GPUs (module docstring)."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    arch = arch or architecture(cfg)
    e, lora = cfg.engine, cfg.model.lora
    world = 1 if e.kind == "local" else world_size
    frozen_b, compute = DTYPE_BYTES[cfg.model.dtype], DTYPE_BYTES[e.precision]
    host_opt, host_par = e.offload_optimizer, e.offload_params
    batch = per_gpu_batch(cfg, world_size)

    n_den = count(arch.denoiser)
    n_lora = lora_count(arch.denoiser, lora) if lora.enabled else 0
    n_student, t_student = n_den + n_lora, n_lora or n_den
    n_heads, n_sam = count(arch.heads), count(arch.sam)
    n_vae, n_text = count(arch.vae), sum(count(t) for t in arch.text_encoders)
    counts = {"generator": (n_student, t_student), "fake_score": (n_student, t_student),
              "discriminator": (n_heads + n_sam, n_heads), "teacher": (n_den, 0), "decoder": (n_vae, 0),
              "text_encoders": (n_text, 0)}
    rows = [_trainable_row("generator", n_student, t_student, cfg, world, host_opt, host_par),
            _trainable_row("fake_score", n_student, t_student, cfg, world, host_opt, host_par),
            _trainable_row("discriminator", n_heads, n_heads, cfg, world, host_opt, host_par,
                           frozen_b, n_sam)]
    if cfg.stage1.generator_ema:  # kept in stage 2 too (it continues the hand-over's EMA)
        counts["generator EMA"] = (t_student, 0)
        rows.append(_ema_row(cfg, t_student, world))
    teacher_world = world if e.teacher_sharding == "zero3" else 1
    rows += [Row("teacher", frozen_b * n_den // teacher_world), Row("decoder", frozen_b * n_vae),
             Row("text_encoders", frozen_b * n_text)]
    if _reward_present(cfg, arch, stage):  # LPO's LRM: down + mid blocks and its own text encoders
        counts["reward"] = (count(arch.lrm) + n_text, 0)
        rows.append(Row("reward", frozen_b * counts["reward"][0]))
    if stage == 2:  # spec 2.4: the frozen pre-RL generator, in the compute dtype (algo/stage2.reference_copy)
        counts["reference"] = (n_student, 0)
        rows.append(Row("reference", compute * n_student // teacher_world))
    if e.kind != "local":  # FSDP2 gathers whole blocks (current + prefetched); ZeRO-3 caps live parameters
        gathered = 2 * max(largest_block(arch.denoiser), largest_block(arch.sam))
        if e.kind == "deepspeed":
            gathered = min(gathered, DS_MAX_LIVE_PARAMETERS)
        rows.append(Row("gathered blocks", compute * gathered))
    peak_turn = ""
    if with_activations:
        turns = [_stage1_turn(cfg, arch, batch, compute / 4)]
        if stage == 2:
            turns.append(_rl_turn(cfg, arch, batch, compute / 4))
        peak = max(turns, key=lambda turn: turn.total)
        rows += peak.rows
        peak_turn = peak.name
    settings = {"engine": e.kind, "precision": e.precision, "model.dtype": cfg.model.dtype,
                "lora": lora.enabled, "batch/GPU": batch, "resolution": cfg.data.resolution,
                "gradient_checkpointing": e.gradient_checkpointing, "decoder_checkpointing": e.decoder_checkpointing,
                "decode_micro_batch": e.decode_micro_batch, "sam_checkpointing": e.sam_checkpointing,
                "gan_batch_fraction": cfg.stage1.gan_batch_fraction, "offload_optimizer": host_opt,
                "offload_params": host_par, "teacher_sharding": e.teacher_sharding, "mode": cfg.stage1.mode,
                "stage": stage, "peak": peak_turn}
    shares = cfg.data.shares(world_size)
    result = Plan(cfg.model.family, e.kind, world_size, gpu_mem_gib, reserve_gib, rows, counts, settings,
                  global_batch=sum(shares), shares=shares, host_startup=_host_startup(cfg, arch, stage, rows, n_student),
                  gpus_per_node=min(gpus_per_node, world_size))
    if with_flops:
        from flashdmd.nets.families import get_family

        latent = get_family(cfg.model.family).latent_shape(cfg.data.resolution)
        result.flops = iteration_flops(cfg, arch, batch, latent, stage)
        # the engine does not change FLOPs; dmd2 is refused with a sharded engine, the SDXL presets'
        as_dmd2 = ["stage1.mode=dmd2", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "engine.kind=local",
                   "engine.teacher_sharding=replicate", "engine.offload_optimizer=false", "engine.offload_params=false"]
        dmd2 = iteration_flops(_with(cfg, as_dmd2), arch, batch, latent, stage)
        result.flops_ratio = sum(result.flops.values()) / sum(dmd2.values())
    if suggest and with_activations and not result.fits:
        result.suggestion = cheapest_fix(cfg, world_size, stage, gpu_mem_gib, reserve_gib, arch)
    return result


# Single changes, cheapest first: what each costs in step time or in the recipe.
FIXES: list[tuple[str, list[str]]] = [
    ("shard the teacher (engine.teacher_sharding=zero3): one all-gather per teacher forward",
     ["engine.teacher_sharding=zero3"]),
    ("SAM checkpointing (engine.sam_checkpointing=true): one more SAM forward per GAN step",
     ["engine.sam_checkpointing=true"]),
    ("decoder checkpointing in micro-batches (engine.decoder_checkpointing=true engine.decode_micro_batch=1): "
     "one more decode per GAN step", ["engine.decoder_checkpointing=true", "engine.decode_micro_batch=1"]),
    ("gradient checkpointing (engine.gradient_checkpointing=true): ~30 % more compute",
     ["engine.gradient_checkpointing=true"]),
    ("FSDP2 instead of replicas (engine.kind=fsdp)", ["engine.kind=fsdp"]),
    ("ZeRO-3 optimizer offload (engine.kind=deepspeed engine.offload_optimizer=true): host-bound steps",
     ["engine.kind=deepspeed", "engine.offload_optimizer=true"]),
    ("GAN branch on a quarter of the batch (stage1.gan_batch_fraction=0.25): changes the recipe",
     ["stage1.gan_batch_fraction=0.25"]),
    ("LoRA on the generator and fake score (model.lora.enabled=true): changes the recipe",
     ["model.lora.enabled=true"]),
]


def _with(cfg: Config, overrides: list[str]) -> Config:
    changed = copy.deepcopy(cfg)
    for item in overrides:
        apply_override(changed, item)
    return validate(changed)


def cheapest_fix(cfg: Config, world_size: int, stage: int, gpu_mem_gib: float, reserve_gib: float,
                 arch: Architecture) -> str:
    """The first single change of FIXES, then more GPUs, then a smaller batch, that makes the run fit."""
    def fits(changed: Config, world: int) -> bool:
        return plan(changed, world, stage, gpu_mem_gib, reserve_gib, arch, suggest=False, with_flops=False).fits

    for text, overrides in FIXES:
        try:
            changed = _with(cfg, overrides)
        except ConfigError:  # not applicable to this config (e.g. teacher sharding on the local engine)
            continue
        if changed != cfg and fits(changed, world_size):
            return text
    if cfg.engine.kind != "local":
        for factor in (2, 4, 8):
            try:
                if fits(cfg, world_size * factor):
                    return f"{factor}x the GPUs ({world_size * factor} in all)"
            except ConfigError:  # fewer samples in the global batch than GPUs
                continue
    batch = per_gpu_batch(cfg, world_size)
    while batch > 1:
        batch //= 2
        if fits(_with(cfg, [f"data.batch_size={batch}", "data.global_batch_size=0"]), world_size):
            return f"per-GPU batch {batch} (data.batch_size={batch}; raise nodes to keep the global batch)"
    return "no single change fits; combine the savers above, ZeRO-3 offload and LoRA"


def _flops(value: float) -> str:
    return f"{value / 1e15:.1f} PFLOP" if value >= 1e14 else f"{value / 1e12:.3g} TFLOP"


def _shares_text(shares: list[int]) -> str:
    """``2 per GPU x 32 GPUs``, or for an uneven split ``2 per GPU on 16 GPUs, 1 on 16``."""
    big, small = max(shares), min(shares)
    if big == small:
        return f"{big} per GPU x {len(shares)} GPUs"
    n_big = shares.count(big)
    return (f"{big} per GPU on {n_big} GPUs, {small} on {len(shares) - n_big} (uneven: losses reweighted "
            f"exactly, memory planned for {big})")


def render(p: Plan) -> str:
    gib = lambda b: f"{b / GIB:8.2f}"
    lines = [f"{p.family} on {p.world_size} GPU(s), engine {p.engine}: "
             + ", ".join(f"{k}={v}" for k, v in p.settings.items()),
             f"global batch {p.global_batch}: {_shares_text(p.shares)}",
             (f"{'network':<22}{'params M':>10}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'GPU GiB':>9}"
              f"{'host GiB':>9}")]
    for r in p.rows:
        n = p.counts.get(r.network, (0, 0))[0]
        lines.append(f"{r.network:<22}{n / 1e6:>10.1f}{gib(r.params)}{gib(r.grads)}{gib(r.optimizer)}"
                     f"{gib(r.activations)}{gib(r.gpu)}{gib(r.host)}")
    lines.append(f"{'total':<22}{'':>10}{'':>36}{gib(p.gpu_bytes)}{gib(sum(r.host for r in p.rows))}")
    lines.append(f"host memory at start-up: {p.host_startup / GIB:.1f} GiB per rank, "
                 f"{p.host_node_bytes / GIB:.1f} GiB per node ({p.gpus_per_node} ranks)")
    if p.flops:
        per_net = ", ".join(f"{k} {_flops(v)}" for k, v in sorted(p.flops.items(), key=lambda kv: -kv[1]) if v)
        lines.append(f"FLOPs per iteration per GPU: {_flops(sum(p.flops.values()))} ({per_net}); "
                     f"Flash-DMD / DMD2 FLOP ratio {p.flops_ratio:.2f}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"per-GPU {p.gpu_bytes / GIB:.1f} GiB + {p.reserve_gib:.1f} GiB reserve vs {p.gpu_mem_gib:.0f} GiB: "
                 f"{verdict}")
    if p.suggestion:
        lines.append(f"cheapest change that fits: {p.suggestion}")
    return "\n".join(lines)


# The engine layouts the matrix compares (local, FSDP2 and ZeRO-3, with and without offload).
LAYOUTS: dict[str, list[str]] = {
    "local (DDP replicas)": ["engine.kind=local", "engine.teacher_sharding=replicate"],
    "FSDP2": ["engine.kind=fsdp"],
    "FSDP2 + CPU offload": ["engine.kind=fsdp", "engine.offload_optimizer=true"],
    "ZeRO-3": ["engine.kind=deepspeed"],
    "ZeRO-3 + optimizer offload": ["engine.kind=deepspeed", "engine.offload_optimizer=true"],
    "ZeRO-3 + optimizer and parameter offload": ["engine.kind=deepspeed", "engine.offload_optimizer=true",
                                                 "engine.offload_params=true"],
}


def matrix(cfg: Config, world_size: int, stage: int = 1, gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0,
           arch: Architecture | None = None) -> str:
    """Per-GPU GiB of every engine layout, with and without gradient checkpointing."""
    arch = arch or architecture(cfg)
    lines = [(f"{cfg.model.family}, {world_size} GPU(s), batch {per_gpu_batch(cfg, world_size)}/GPU at "
              f"{cfg.data.resolution} px, {gpu_mem_gib:.0f} GiB GPUs ({reserve_gib:.1f} GiB reserve)"),
             f"{'layout':<42}{'no checkpointing':>18}{'checkpointing':>16}{'host GiB':>10}"]
    for name, overrides in LAYOUTS.items():
        cells, host = [], 0
        for gc in ("false", "true"):
            p = plan(_with(cfg, [*overrides, f"engine.gradient_checkpointing={gc}"]), world_size, stage, gpu_mem_gib,
                     reserve_gib, arch, suggest=False, with_flops=False)
            cells.append(f"{p.gpu_bytes / GIB:.1f}{'' if p.fits else ' (no)'}")
            host = sum(r.host for r in p.rows)
        lines.append(f"{name:<42}{cells[0]:>18}{cells[1]:>16}{host / GIB:>10.1f}")
    lines.append("(no): does not fit")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashdmd.planner", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name in jobs/configs or a YAML path")
    parser.add_argument("--nodes", type=int, help="default: launch.nodes of the config")
    parser.add_argument("--gpus-per-node", type=int, help="default: launch.gpus_per_node of the config")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB kept free (CUDA context, fragmentation)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--matrix", action="store_true",
                        help="also print every engine layout with and without gradient checkpointing")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        nodes = args.nodes or cfg.launch.nodes
        gpus = args.gpus_per_node or cfg.launch.gpus_per_node
        arch = architecture(cfg)  # built and probed once for the plan and the matrix (seconds on a real family)
        result = plan(cfg, nodes * gpus, args.stage, args.gpu_mem, args.reserve, arch, gpus_per_node=gpus)
        print(render(result))
        if args.matrix:
            print()
            print(matrix(cfg, nodes * gpus, args.stage, args.gpu_mem, args.reserve, arch))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(cli())
