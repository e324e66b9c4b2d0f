"""Memory planner: per-GPU bytes of a Flash-DMD run before it is submitted.

``plan(cfg, world_size)`` instantiates the family's real architectures on the meta device (no
weights, no download): the UNet / MMDiT, VAE, CLIP (and T5) text encoders, the SAM vision
encoder with the Pixel-GAN heads, and counts every parameter. The diffusers / transformers
configs of the real families are the public ``config.json`` values of the hub checkpoints the
presets name (SD1.5, SDXL-base-1.0, SD3-Medium, SAM ViT-B/L/H), written out below; the tiny
families use the very configs ``flashdmd.nets.tiny`` builds. From the counts and the engine it
estimates, per GPU:

- trainable networks (generator, fake score, discriminator): parameters are fp32 masters
  (``flashdmd.nets.registry`` keeps them fp32; with LoRA the frozen base is an fp32 copy too),
  gradients one per trainable parameter, AdamW two moments. local/DDP hold full replicas;
  FSDP2 shards everything (4 B params, 4 B grads, 8 B moments, / world); DeepSpeed ZeRO-3 keeps
  compute-dtype parameter and gradient partitions plus the fp32 master and moments (12 B).
  The discriminator's frozen SAM backbone lives inside it and is sharded with it.
- frozen networks (teacher, VAE, text encoders, LRM and the stage-2 reference) in
  ``model.dtype``, replicated; the teacher (and reference) sharded with ``teacher_sharding=zero3``.
- sharded engines' working set: FSDP2 gathers a whole block (``engine.common.block_modules``:
  for SDXL an up block of 1.2 B parameters) plus the prefetched next one; ZeRO-3 holds at most
  ``stage3_max_live_parameters`` (default 1e9) gathered parameters.
- activations (rough): tensors autograd saves for backward, recorded with saved-tensor hooks
  while the real modules run forward on meta tensors, at the per-GPU batch and resolution, scaled
  from fp32 to the compute dtype. Attention is counted as flash attention would keep it (q, k,
  v, output, log-sum-exp), not as the math kernel's full score matrix. A stage-1 generator turn
  holds two generator forwards (the DM and the GAN branch; one in DMD2 mode), one VAE decode and
  one SAM + heads forward; the fake-score turn holds one, so the generator turn is the peak.
  With gradient checkpointing the saved tensors are the block inputs plus one block's
  recomputed activations. Transient no-grad forwards (teacher with CFG), the CUDA context and
  allocator fragmentation are not modelled: ``--reserve`` GiB are kept free for them.

Host memory of the offloaded states is reported separately. ``tests/apps/test_planner.py`` checks the
parameter, gradient and optimizer rows against the real local and FSDP2 engines on tiny-sdxl.

    python -m flashdmd.apps.plan --config sdxl-4step --nodes 4 [--gpus-per-node 8] [--gpu-mem 80] [--matrix]
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Self

import torch
from torch import Tensor, nn

from flashdmd.config import Config, ConfigError, LoraConfig, apply_override, load_config, validate

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
REAL_TEXT_LENGTH = 77  # CLIP context length
REAL_T5_LENGTH = 256  # flashdmd.nets.registry: T5 slot length of real SD3
DS_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters (flashdmd keeps it)

# -- real architectures (public config.json values of the checkpoints the presets name) ---------
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}  # every other value is diffusers' default
SDXL_UNET = {
    "sample_size": 128, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}
SD3_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}
SD_VAE = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu"}
SAM = {  # vision encoders of facebook/sam-vit-{base,large,huge}
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    "huge": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
}


@dataclass
class Architecture:
    """The networks of one family on the meta device, with what the activation probe needs."""

    denoiser: nn.Module  # diffusers UNet2DConditionModel or SD3Transformer2DModel
    vae: nn.Module
    text_encoders: list[nn.Module]
    sam: nn.Module  # transformers SamVisionModel
    heads: nn.Module  # the Pixel-GAN heads (PixelGANDiscriminator.heads)
    kind: str
    text_length: int  # tokens of the denoiser's text conditioning
    lrm: bool  # whether a latent reward model is loaded (tiny families always; real: model.reward_model)
    taps: list[int] = field(default_factory=list)
    probed: dict[tuple[int, int], Activations] = field(default_factory=dict)  # (batch, resolution) -> fp32 bytes


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _sam_size(name: str) -> str:
    for size in SAM:
        if f"vit-{size}" in name or f"vit_{size[0]}" in name:
            return size
    raise ConfigError(f"model.sam={name!r}: the planner knows facebook/sam-vit-base, -large and -huge; "
                      "name one of them (or a folder whose name contains vit-base/vit-large/vit-huge)")


def architecture(cfg: Config) -> Architecture:
    """Meta-device instances of ``cfg.model.family``'s networks (tiny: the tiny configs)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        SamVisionConfig,
        SamVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from flashdmd.nets.discriminator import PixelGANDiscriminator, SamBackbone
    from flashdmd.nets.families import get_family

    if cfg.model.family == "gmm2d":
        raise ConfigError("the planner covers image families (sd15, sdxl, sd3 and tiny-*), not gmm2d")
    family = get_family(cfg.model.family)
    if family.tiny:
        from flashdmd.nets.tiny import T5_LENGTH, TOKEN_LENGTH, tiny_sam_config, tiny_teacher_pipeline

        pipe = tiny_teacher_pipeline(family)  # tiny: built for real (seconds), then moved to meta
        denoiser = (pipe.transformer if family.kind == "sd3" else pipe.unet).to("meta")
        texts = [getattr(pipe, f).to("meta") for f in family.text_folders]
        if family.kind == "sd3" and cfg.model.use_t5:
            texts.append(pipe.text_encoder_3.to("meta"))
        vae, sam_config, width = pipe.vae.to("meta"), tiny_sam_config(), 32
        length = TOKEN_LENGTH + (T5_LENGTH if family.kind == "sd3" else 0)
    else:
        sam_config = SamVisionConfig(**SAM[_sam_size(cfg.model.sam or family.default_sam)])
        width, length = 256, REAL_TEXT_LENGTH
        if family.kind == "sd15":
            denoiser = _meta(lambda: UNet2DConditionModel(**SD15_UNET))
            texts = [_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))]
        elif family.kind == "sdxl":
            denoiser = _meta(lambda: UNet2DConditionModel(**SDXL_UNET))
            texts = [_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                     _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))]
        else:
            denoiser = _meta(lambda: SD3Transformer2DModel(**SD3_MEDIUM))
            texts = [_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
                     _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))]
            if cfg.model.use_t5:
                texts.append(_meta(lambda: T5EncoderModel(T5Config(**T5_XXL))))
            length += REAL_T5_LENGTH
        sd3 = family.kind == "sd3"
        vae = _meta(lambda: AutoencoderKL(**SD_VAE, latent_channels=family.latent_channels, use_quant_conv=not sd3,
                                          use_post_quant_conv=not sd3))
    sam = _meta(lambda: SamVisionModel(sam_config))
    disc = _meta(lambda: PixelGANDiscriminator(SamBackbone(sam, cfg.model.sam_taps or None), width))
    return Architecture(denoiser, vae, texts, sam, disc.heads, family.kind, length,
                        lrm=family.tiny or bool(cfg.model.reward_model), taps=disc.backbone.taps)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_count(module: nn.Module, lora: LoraConfig) -> int:
    """Trainable LoRA parameters PEFT adds: r * (in + out) per targeted Linear (peft's name match)."""
    total = 0
    for name, m in module.named_modules():
        if any(name == t or name.endswith("." + t) for t in lora.target_modules):
            if isinstance(m, nn.Linear):
                total += lora.rank * (m.in_features + m.out_features)
            elif isinstance(m, nn.Conv2d):
                total += lora.rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


def largest_block(module: nn.Module) -> int:
    """Parameters of the largest block an FSDP2 / ZeRO-3 engine gathers at once."""
    from flashdmd.engine.common import block_modules

    blocks = block_modules(module)
    return max((count(b) for b in blocks), default=count(module))


# -- activations: saved tensors of a meta forward -------------------------------------------------
class _FlashAttention(torch.autograd.Function):
    """Stand-in for scaled_dot_product_attention that saves what a flash kernel keeps."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _SavedBytes:
    """Bytes of distinct non-parameter tensors autograd saves inside the context."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.tensors = params, {}

    @property
    def total(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _pack(self, t: Tensor) -> Tensor:
        if id(t) not in self.params:
            self.tensors[id(t)] = t
        return t

    def __enter__(self) -> Self:
        import torch.nn.functional as F

        self._sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FlashAttention.apply(q, k, v)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.nn.functional as F

        self._hooks.__exit__(*exc)
        F.scaled_dot_product_attention = self._sdpa


def _saved(modules: list[nn.Module], run: Callable[[], Any], checkpointing: bool = False) -> int:
    """Bytes autograd saves while ``run()`` executes; with ``checkpointing`` (the modules'
    diffusers/transformers gradient checkpointing switched on) plus the largest checkpointed
    unit's own activations, which backward recomputes one unit at a time."""
    params = {id(p) for m in modules for p in m.parameters()}
    probe, unit, patched = _SavedBytes(params), [0], []

    def measured(func: Callable[..., Any]) -> Callable[..., Any]:
        def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with _SavedBytes(params) as inner:
                fn(*args, **kwargs)
            unit[0] = max(unit[0], inner.total)
            return func(fn, *args, **kwargs)
        return call

    if checkpointing:
        for sub in (s for m in modules for s in m.modules()):
            func = getattr(sub, "_gradient_checkpointing_func", None)
            if callable(func) and getattr(sub, "gradient_checkpointing", False):
                patched.append((sub, func))
                sub._gradient_checkpointing_func = measured(func)
    try:
        with probe:
            run()
    finally:
        for sub, func in patched:
            sub._gradient_checkpointing_func = func
    return probe.total + unit[0]


def _denoiser_run(arch: Architecture, batch: int, latent: tuple[int, int, int]) -> Callable[[], Any]:
    net, kind = arch.denoiser, arch.kind

    def run() -> Any:
        x = torch.empty(batch, *latent, device="meta")
        t = torch.empty(batch, device="meta")
        if kind == "sd3":
            c = net.config
            return net(x, torch.empty(batch, arch.text_length, c.joint_attention_dim, device="meta"),
                       torch.empty(batch, c.pooled_projection_dim, device="meta"), t).sample
        c = net.config
        cond = torch.empty(batch, arch.text_length, c.cross_attention_dim, device="meta")
        added = None
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled, device="meta"),
                     "time_ids": torch.empty(batch, 6, device="meta")}
        return net(x, t, cond, added_cond_kwargs=added).sample

    return run


@dataclass
class Activations:
    generator: int  # one trainable forward of the denoiser at the per-GPU batch, bytes
    generator_gc: int  # the same with gradient checkpointing
    decoder: int  # one VAE decode with grad to its input
    discriminator: int  # SAM forward with grad to its input + heads
    discriminator_gc: int  # the same with SAM's gradient checkpointing


def activations(arch: Architecture, batch: int, resolution: int, latent: tuple[int, int, int],
                compute_bytes: int) -> Activations:
    """Saved-tensor bytes of the stage-1 forwards (fp32 on meta, scaled to the compute dtype)."""
    scale = compute_bytes / 4
    if (batch, resolution) not in arch.probed:
        arch.probed[batch, resolution] = _probe(arch, batch, resolution, latent)
    fp32 = arch.probed[batch, resolution]
    return Activations(*(int(getattr(fp32, f.name) * scale) for f in fields(Activations)))


def _sam_checkpointing(sam: nn.Module, on: bool) -> None:
    """transformers >= 5.2x calls it activation checkpointing (as flashdmd.nets.discriminator does)."""
    if hasattr(sam, "activation_checkpointing_enable"):
        if on:
            sam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            sam.activation_checkpointing_disable()
    elif on:
        sam.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        sam.gradient_checkpointing_disable()


def _probe(arch: Architecture, batch: int, resolution: int, latent: tuple[int, int, int]) -> Activations:
    net = arch.denoiser.requires_grad_(True)
    run = _denoiser_run(arch, batch, latent)
    full = _saved([net], run)
    net.enable_gradient_checkpointing()
    try:
        gc = _saved([net], run, checkpointing=True)
    finally:
        net.disable_gradient_checkpointing()

    def decode() -> Any:
        z = torch.empty(batch, *latent, device="meta", requires_grad=True)
        return arch.vae.decode(z).sample

    vae = _saved([arch.vae.requires_grad_(False)], decode)
    side = arch.sam.config.image_size

    def disc() -> Any:
        x = torch.empty(batch, 3, side, side, device="meta", requires_grad=True)
        hidden = arch.sam(pixel_values=x, output_hidden_states=True).hidden_states
        return [head(hidden[k].permute(0, 3, 1, 2)) for head, k in zip(arch.heads, arch.taps)]

    modules = [arch.sam.requires_grad_(False), arch.heads]
    sam = _saved(modules, disc)
    _sam_checkpointing(arch.sam, True)
    try:
        sam_gc = _saved(modules, disc, checkpointing=True)
    finally:
        _sam_checkpointing(arch.sam, False)
    resize = batch * 3 * resolution * resolution * 4 if side != resolution else 0  # the resize saves its input
    return Activations(full, gc, vae, sam + resize, sam_gc + resize)


# -- the plan --------------------------------------------------------------------------------------
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
    suggestion: str = ""

    @property
    def gpu_bytes(self) -> int:
        return sum(r.gpu for r in self.rows)

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


def plan(cfg: Config, world_size: int, stage: int = 1, gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0,
         arch: Architecture | None = None, with_activations: bool = True, suggest: bool = True) -> Plan:
    """Per-GPU memory of ``cfg`` on ``world_size`` GPUs (see the module docstring for the model)."""
    from flashdmd.nets.families import get_family

    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    arch = arch or architecture(cfg)
    family = get_family(cfg.model.family)
    e, lora = cfg.engine, cfg.model.lora
    world = 1 if e.kind == "local" else world_size
    frozen_b, compute = DTYPE_BYTES[cfg.model.dtype], DTYPE_BYTES[e.precision]
    host_opt, host_par = e.offload_optimizer, e.offload_params

    n_den = count(arch.denoiser)
    n_student = n_den + (lora_count(arch.denoiser, lora) if lora.enabled else 0)
    t_student = lora_count(arch.denoiser, lora) if lora.enabled else n_den
    n_heads, n_sam = count(arch.heads), count(arch.sam)
    n_vae, n_text = count(arch.vae), sum(count(t) for t in arch.text_encoders)
    counts = {"generator": (n_student, t_student), "fake_score": (n_student, t_student),
              "discriminator": (n_heads + n_sam, n_heads), "teacher": (n_den, 0), "decoder": (n_vae, 0),
              "text_encoders": (n_text, 0)}
    rows = [_trainable_row("generator", n_student, t_student, cfg, world, host_opt, host_par),
            _trainable_row("fake_score", n_student, t_student, cfg, world, host_opt, host_par),
            _trainable_row("discriminator", n_heads, n_heads, cfg, world, host_opt, host_par,
                           frozen_b, n_sam)]
    teacher_world = world if e.teacher_sharding == "zero3" else 1
    rows += [Row("teacher", frozen_b * n_den // teacher_world), Row("decoder", frozen_b * n_vae),
             Row("text_encoders", frozen_b * n_text)]
    if arch.lrm:  # LPO's LRM: a UNet initialised from the teacher's with its own text encoders
        counts["reward"] = (n_den + n_text, 0)
        rows.append(Row("reward", frozen_b * (n_den + n_text)))
    if stage == 2:  # spec 2.4: the frozen pre-RL generator (a deepcopy: fp32)
        counts["reference"] = (n_student, 0)
        rows.append(Row("reference", 4 * n_student // teacher_world))
    if e.kind != "local":  # FSDP2 gathers whole blocks (current + prefetched); ZeRO-3 caps live parameters
        gathered = 2 * max(largest_block(arch.denoiser), largest_block(arch.sam))
        if e.kind == "deepspeed":
            gathered = min(gathered, DS_MAX_LIVE_PARAMETERS)
        rows.append(Row("gathered blocks", compute * gathered))
    if with_activations:
        latent = family.latent_shape(cfg.data.resolution)
        act = activations(arch, cfg.data.batch_size, cfg.data.resolution, latent, compute)
        gen = act.generator_gc if e.gradient_checkpointing else act.generator
        branches = 1 if cfg.stage1.mode == "dmd2" else 2
        disc = act.discriminator_gc if e.gradient_checkpointing else act.discriminator
        rows += [Row(f"act: generator x{branches}", 0, activations=branches * gen),
                 Row("act: VAE decode", 0, activations=act.decoder), Row("act: SAM + heads", 0, activations=disc)]
    settings = {"engine": e.kind, "precision": e.precision, "model.dtype": cfg.model.dtype,
                "lora": lora.enabled, "batch/GPU": cfg.data.batch_size, "resolution": cfg.data.resolution,
                "gradient_checkpointing": e.gradient_checkpointing, "offload_optimizer": host_opt,
                "offload_params": host_par, "teacher_sharding": e.teacher_sharding, "mode": cfg.stage1.mode,
                "stage": stage}
    result = Plan(cfg.model.family, e.kind, world_size, gpu_mem_gib, reserve_gib, rows, counts, settings)
    if suggest and with_activations and not result.fits:
        result.suggestion = cheapest_fix(cfg, world_size, stage, gpu_mem_gib, reserve_gib, arch)
    return result


# Single changes, cheapest first: what each costs in step time or in the recipe.
FIXES: list[tuple[str, list[str]]] = [
    ("shard the teacher (engine.teacher_sharding=zero3): one all-gather per teacher forward",
     ["engine.teacher_sharding=zero3"]),
    ("gradient checkpointing (engine.gradient_checkpointing=true): ~30 % more compute",
     ["engine.gradient_checkpointing=true"]),
    ("FSDP2 instead of replicas (engine.kind=fsdp)", ["engine.kind=fsdp"]),
    ("ZeRO-3 optimizer offload (engine.kind=deepspeed engine.offload_optimizer=true): host-bound steps",
     ["engine.kind=deepspeed", "engine.offload_optimizer=true"]),
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
    for text, overrides in FIXES:
        try:
            changed = _with(cfg, overrides)
        except ConfigError:  # a change this config refuses (e.g. sharding the teacher on the local engine)
            continue
        if changed == cfg:
            continue
        if plan(changed, world_size, stage, gpu_mem_gib, reserve_gib, arch, suggest=False).fits:
            return text
    if cfg.engine.kind != "local":
        for factor in (2, 4, 8):
            if plan(cfg, world_size * factor, stage, gpu_mem_gib, reserve_gib, arch, suggest=False).fits:
                return f"{factor}x the GPUs ({world_size * factor} in all)"
    batch = cfg.data.batch_size
    while batch > 1:
        batch //= 2
        if plan(_with(cfg, [f"data.batch_size={batch}"]), world_size, stage, gpu_mem_gib, reserve_gib, arch,
                suggest=False).fits:
            return f"per-GPU batch {batch} (data.batch_size={batch}; raise nodes to keep the global batch)"
    return "no single change fits; combine gradient checkpointing, ZeRO-3 offload and LoRA"


def render(p: Plan) -> str:
    gib = lambda b: f"{b / GIB:8.2f}"
    lines = [f"{p.family} on {p.world_size} GPU(s), engine {p.engine}: "
             + ", ".join(f"{k}={v}" for k, v in p.settings.items()),
             (f"{'network':<16}{'params M':>10}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'GPU GiB':>9}"
             f"{'host GiB':>9}")]
    for r in p.rows:
        n = p.counts.get(r.network, (0, 0))[0]
        lines.append(f"{r.network:<16}{n / 1e6:>10.1f}{gib(r.params)}{gib(r.grads)}{gib(r.optimizer)}"
                     f"{gib(r.activations)}{gib(r.gpu)}{gib(r.host)}")
    lines.append(f"{'total':<16}{'':>10}{'':>36}{gib(p.gpu_bytes)}{gib(sum(r.host for r in p.rows))}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"per-GPU {p.gpu_bytes / GIB:.1f} GiB + {p.reserve_gib:.1f} GiB reserve vs {p.gpu_mem_gib:.0f} GiB: "
                 f"{verdict}")
    if p.suggestion:
        lines.append(f"cheapest change that fits: {p.suggestion}")
    return "\n".join(lines)


# The engine layouts the matrix compares (local, FSDP2 and ZeRO-3, with and without offload).
LAYOUTS: dict[str, list[str]] = {
    "local (DDP replicas)": ["engine.kind=local"],
    "FSDP2": ["engine.kind=fsdp"],
    "FSDP2 + CPU offload": ["engine.kind=fsdp", "engine.offload_optimizer=true"],
    "ZeRO-3": ["engine.kind=deepspeed"],
    "ZeRO-3 + optimizer offload": ["engine.kind=deepspeed", "engine.offload_optimizer=true"],
    "ZeRO-3 + optimizer and parameter offload": ["engine.kind=deepspeed", "engine.offload_optimizer=true",
                                                 "engine.offload_params=true"],
}


def matrix(cfg: Config, world_size: int, stage: int = 1, gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0) -> str:
    """Per-GPU GiB of every engine layout, with and without gradient checkpointing."""
    arch = architecture(cfg)
    lines = [(f"{cfg.model.family}, {world_size} GPU(s), batch {cfg.data.batch_size}/GPU at {cfg.data.resolution} px, "
              f"{gpu_mem_gib:.0f} GiB GPUs ({reserve_gib:.1f} GiB reserve)"),
             f"{'layout':<42}{'no checkpointing':>18}{'checkpointing':>16}{'host GiB':>10}"]
    for name, overrides in LAYOUTS.items():
        cells, host = [], 0
        for gc in ("false", "true"):
            p = plan(_with(cfg, [*overrides, f"engine.gradient_checkpointing={gc}"]), world_size, stage, gpu_mem_gib,
                     reserve_gib, arch, suggest=False)
            cells.append(f"{p.gpu_bytes / GIB:.1f}{'' if p.fits else ' (no)'}")
            host = sum(r.host for r in p.rows)
        lines.append(f"{name:<42}{cells[0]:>18}{cells[1]:>16}{host / GIB:>10.1f}")
    lines.append("(no): does not fit")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashdmd.apps.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name in jobs/configs or a YAML path")
    parser.add_argument("--nodes", type=int, help="default: launch.nodes of the config")
    parser.add_argument("--gpus-per-node", type=int, help="default: launch.gpus_per_node of the config")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--reserve", type=float, default=2.0,
                        help="GiB per GPU kept free for the CUDA context and fragmentation (default 2)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1,
                        help="1: distillation; 2: adds the latent reward model and the frozen reference (default 1)")
    parser.add_argument("--matrix", action="store_true",
                        help="also print every engine layout with and without gradient checkpointing")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, after the preset")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        nodes = args.nodes or cfg.launch.nodes
        gpus = args.gpus_per_node or cfg.launch.gpus_per_node
        result = plan(cfg, nodes * gpus, args.stage, args.gpu_mem, args.reserve)
        print(render(result))
        if args.matrix:
            print()
            print(matrix(cfg, nodes * gpus, args.stage, args.gpu_mem, args.reserve))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(cli())
