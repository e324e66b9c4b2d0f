"""The planner's view of a family: its real architectures on the meta device, and what they save.

``architecture(cfg)`` instantiates the networks on the meta device (no weights, no download):
the UNet / MMDiT, VAE, CLIP (and T5) text encoders, the SAM vision encoder with the Pixel-GAN
heads. The diffusers / transformers configs of the real families are the public ``config.json``
values of the hub checkpoints the presets name (SD1.5, SDXL-base-1.0, SD3-Medium, SAM
ViT-B/L/H), written out below; the tiny families use the very configs ``flashdmd.nets.tiny``
builds.

``per_sample(arch, resolution)`` measures, for ONE sample, the bytes autograd saves for
backward while the real modules run forward on meta tensors (saved-tensor hooks), with every
saver off and on: generator forward, VAE decode with grad to its input, SAM + heads with grad
to the image. Saved bytes are linear in the batch (every saved tensor has a batch dimension),
so the plan scales them. Attention is counted as flash attention keeps it (q, k, v, output,
log-sum-exp). With checkpointing, a unit's inputs stay alive (counted) and backward recomputes
one unit at a time (its own saved bytes, ``unit``). SAM's checkpointing is probed in training
mode, as ``flashdmd.nets.discriminator`` runs it (transformers checkpoints training-mode layers only).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import Tensor, nn

from flashdmd.config import Config, ConfigError, LoraConfig

GIB = 2**30
REAL_TEXT_LENGTH = 77  # CLIP context length
REAL_T5_LENGTH = 256  # flashdmd.nets.registry: T5 slot length of real SD3

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
LRM_UNUSED = ("up_blocks", "conv_norm_out", "conv_out")  # what flashdmd.nets.reward trims from the LRM's UNet


@dataclass
class PerSample:
    """fp32 bytes one sample saves for backward (``*_unit``: the largest unit recomputed at once)."""

    generator: int
    generator_gc: int
    generator_gc_unit: int
    decoder: int
    decoder_gc: int
    decoder_gc_unit: int
    sam: int  # SAM + heads (+ the resize's input when the image is not SAM's size)
    sam_gc: int
    sam_gc_unit: int
    latent: int  # one latent (what a checkpointed decode chunk keeps)
    largest: dict[str, int] = field(default_factory=dict)  # network -> its largest saved tensor (backward's buffers)


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
    lrm: nn.Module  # the LRM's UNet as flashdmd.nets.reward holds it (down and mid blocks)
    tiny: bool
    taps: list[int] = field(default_factory=list)
    probed: dict[int, PerSample] = field(default_factory=dict)  # resolution -> per-sample bytes
    flops: dict[tuple[int, ...], Any] = field(default_factory=dict)  # latent shape -> plan_flops.UnitFlops


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _sam_size(name: str) -> str:
    for size in SAM:
        if f"vit-{size}" in name or f"vit_{size[0]}" in name:
            return size
    raise ConfigError(f"model.sam={name!r}: the planner knows facebook/sam-vit-base, -large and -huge; "
                      "name one of them (or a folder whose name contains vit-base/vit-large/vit-huge)")


def _lrm_unet(denoiser: nn.Module, kind: str) -> nn.Module:
    """The LRM's UNet: the teacher's (SD1.5/SDXL), an SDXL one for SD3 (nets/reward.py), trimmed."""
    from diffusers import UNet2DConditionModel

    unet = denoiser if kind != "sd3" else _meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    unet = _meta(lambda: UNet2DConditionModel.from_config(unet.config))
    for name in LRM_UNUSED:
        setattr(unet, name, nn.ModuleList() if name == "up_blocks" else nn.Identity())
    return unet


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
        from flashdmd.nets.tiny import T5_LENGTH, TOKEN_LENGTH, tiny_sam_config, tiny_teacher_pipeline, tiny_unet

        pipe = tiny_teacher_pipeline(family)  # tiny: built for real (seconds), then moved to meta
        denoiser = (pipe.transformer if family.kind == "sd3" else pipe.unet).to("meta")
        texts = [getattr(pipe, f).to("meta") for f in family.text_folders]
        if family.kind == "sd3" and cfg.model.use_t5:
            texts.append(pipe.text_encoder_3.to("meta"))
        vae, sam_config, width = pipe.vae.to("meta"), tiny_sam_config(), 32
        length = TOKEN_LENGTH + (T5_LENGTH if family.kind == "sd3" else 0)
        lrm = _lrm_unet(tiny_unet(family).to("meta") if family.kind == "sd3" else denoiser, "tiny")
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
        lrm = _lrm_unet(denoiser, family.kind)
    sam = _meta(lambda: SamVisionModel(sam_config))
    disc = _meta(lambda: PixelGANDiscriminator(SamBackbone(sam, cfg.model.sam_taps or None), width))
    return Architecture(denoiser, vae, texts, sam, disc.heads, family.kind, length, lrm, family.tiny,
                        taps=disc.backbone.taps)


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

    @property
    def largest(self) -> int:
        return max((t.numel() * t.element_size() for t in self.tensors.values()), default=0)

    def keep(self, t: Tensor) -> None:
        base = t._base if t._base is not None else t  # a view shares its base's storage: count the base once
        if id(t) not in self.params and id(base) not in self.params:
            self.tensors[id(base)] = base

    def _pack(self, t: Tensor) -> Tensor:
        self.keep(t)
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


def saved(modules: list[nn.Module], run: Callable[[], Any], checkpointing: bool = False) -> tuple[int, int, int]:
    """(bytes autograd saves while ``run()`` executes, largest recomputed unit's own bytes, largest
    saved tensor: backward holds about two such gradients at once).

    With ``checkpointing`` (the modules' diffusers/transformers checkpointing switched on) the
    saved bytes include each checkpointed unit's inputs, which the checkpoint keeps alive."""
    params = {id(p) for m in modules for p in m.parameters()}
    probe, unit, patched = _SavedBytes(params), [0], []

    def measured(func: Callable[..., Any]) -> Callable[..., Any]:
        def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            for a in args:
                if isinstance(a, Tensor):
                    probe.keep(a)
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
    return probe.total, unit[0], probe.largest


def denoiser_run(arch: Architecture, batch: int, latent: tuple[int, int, int],
                 net: nn.Module | None = None) -> Callable[[], Any]:
    """One forward of the denoiser (or ``net``, same inputs) on meta inputs of ``batch`` samples."""
    net = net or arch.denoiser

    def run() -> Any:
        x = torch.empty(batch, *latent, device="meta")
        t = torch.empty(batch, device="meta")
        c = net.config
        if arch.kind == "sd3" and net is arch.denoiser:
            return net(x, torch.empty(batch, arch.text_length, c.joint_attention_dim, device="meta"),
                       torch.empty(batch, c.pooled_projection_dim, device="meta"), t).sample
        cond = torch.empty(batch, arch.text_length, c.cross_attention_dim, device="meta")
        added = None
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled, device="meta"),
                     "time_ids": torch.empty(batch, 6, device="meta")}
        return net(x, t, cond, added_cond_kwargs=added).sample

    return run


def decode_run(arch: Architecture, batch: int, latent: tuple[int, int, int]) -> Callable[[], Any]:
    def run() -> Any:
        z = torch.empty(batch, *latent, device="meta", requires_grad=True)
        return arch.vae.decode(z).sample
    return run


def sam_run(arch: Architecture, batch: int) -> Callable[[], Any]:
    side = arch.sam.config.image_size

    def run() -> Any:
        x = torch.empty(batch, 3, side, side, device="meta", requires_grad=True)
        hidden = arch.sam(pixel_values=x, output_hidden_states=True).hidden_states
        return [head(hidden[k].permute(0, 3, 1, 2)) for head, k in zip(arch.heads, arch.taps)]
    return run


def _with_checkpointing(enable: Callable[[], None], disable: Callable[[], None],
                        probe: Callable[[], tuple[int, int, int]]) -> tuple[int, int]:
    """(saved bytes, largest unit) of ``probe`` with a network's checkpointing switched on."""
    enable()
    try:
        return probe()[:2]
    finally:
        disable()


def per_sample(arch: Architecture, resolution: int, latent: tuple[int, int, int]) -> PerSample:
    """Saved bytes of one sample through each network, savers off and on (fp32, cached)."""
    from flashdmd.nets.discriminator import set_checkpointing

    if resolution in arch.probed:
        return arch.probed[resolution]
    net = arch.denoiser.requires_grad_(True)
    gen, _, gen_big = saved([net], denoiser_run(arch, 1, latent))
    gen_gc = _with_checkpointing(net.enable_gradient_checkpointing, net.disable_gradient_checkpointing,
                                 lambda: saved([net], denoiser_run(arch, 1, latent), checkpointing=True))
    vae = arch.vae.requires_grad_(False)
    dec, _, dec_big = saved([vae], decode_run(arch, 1, latent))
    dec_gc = _with_checkpointing(vae.enable_gradient_checkpointing, vae.disable_gradient_checkpointing,
                                 lambda: saved([vae], decode_run(arch, 1, latent), checkpointing=True))
    modules = [arch.sam.requires_grad_(False), arch.heads]
    sam, _, sam_big = saved(modules, sam_run(arch, 1))
    arch.sam.train()  # transformers checkpoints training-mode layers only (nets/discriminator.py)
    try:
        sam_gc = _with_checkpointing(lambda: set_checkpointing(arch.sam, True),
                                     lambda: set_checkpointing(arch.sam, False),
                                     lambda: saved(modules, sam_run(arch, 1), checkpointing=True))
    finally:
        arch.sam.eval()
    side = arch.sam.config.image_size
    resize = 3 * resolution * resolution * 4 if side != resolution else 0  # the resize saves its input
    one = PerSample(gen, *gen_gc, dec, *dec_gc, sam + resize, sam_gc[0] + resize, sam_gc[1],
                    latent=4 * latent[0] * latent[1] * latent[2],
                    largest={"generator": gen_big, "decoder": dec_big, "sam": sam_big})
    arch.probed[resolution] = one
    return one
