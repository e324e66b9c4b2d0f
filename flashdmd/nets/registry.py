"""Family registry: ``build_parts(cfg, cache_dir)`` -> Parts for every model.family.

sd15 / sdxl / sd3 load real weights (``model.teacher``: a local diffusers folder or a hub id);
tiny-sd15 / tiny-sdxl / tiny-sd3 build tiny weights once under ``cache_dir`` and then load them
through the very same ``load_pipeline_folder`` path; gmm2d is the 2-D toy world
(``flashdmd.nets.gmm2d``). Roles follow spec 1.1: the teacher is frozen; the generator and the
fake score are copies of the teacher, trainable (full weights, or LoRA adapters on a frozen base
with ``model.lora.enabled``), kept in fp32 as optimiser masters while frozen nets use
``model.dtype``; the decoder is the frozen VAE; the discriminator is a frozen SAM encoder with
trainable heads (spec 1.8); the reward is the frozen LRM (spec 2.2), built for every tiny preset
and for real families when ``model.reward_model`` is set.

The two students are read from the teacher's safetensors in fp32 (not rounded through
``model.dtype``). With ``lazy`` (default: a sharded engine, fsdp or deepspeed) they are built on
the meta device and the engine fills each rank's shard from the files (``flashdmd.nets.lazy``);
otherwise they are read whole here. Both give the same bits. A lazy build with
``engine.teacher_sharding=zero3`` leaves the teacher on the meta device too (in ``model.dtype``,
the values ``from_pretrained`` gives), so no rank reads more of it than its shard.

Frozen helpers the engine may need to move to a device are listed in ``Parts.extras``
(``text_encoder``); ``extras`` also carries the family facts (``family_spec``, VAE
``scaling_factor``/``shift_factor``, ``student_timesteps``, ``teacher_dir``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flashdmd.config import Config
from flashdmd.nets.dmd2_classifier import with_mode_discriminator
from flashdmd.diffusion.schedules import Schedule
from flashdmd.nets.discriminator import PixelGANDiscriminator, SamBackbone
from flashdmd.nets.families import Family, get_family
from flashdmd.nets.interfaces import Conditioning
from flashdmd.nets.lazy import LazyNet, SafetensorsWeights, materialize, meta_module
from flashdmd.nets.load import DTYPES, PipelineParts, freeze, hub_patterns, load_pipeline_folder, resolve_source
from flashdmd.nets.lora import add_lora
from flashdmd.nets.mmdit import MMDiTDenoiser
from flashdmd.nets.parts import Parts
from flashdmd.nets.reward import LatentRewardModel
from flashdmd.nets.text import PromptEncoder
from flashdmd.nets.tiny import T5_LENGTH, ensure_tiny_lrm, ensure_tiny_sam, ensure_tiny_teacher
from flashdmd.nets.unet import UNetDenoiser
from flashdmd.nets.vae import VAEDecoder


def _teacher_folder(cfg: Config, family: Family, cache_dir: Path) -> Path:
    if family.tiny:
        if cfg.model.teacher:
            raise ValueError(f"model.teacher must be empty for {family.name} (tiny weights are built locally); "
                             f"use model.family={family.kind} for real weights")
        return ensure_tiny_teacher(family, cache_dir)
    return resolve_source(cfg.model.teacher or family.default_teacher, "model.teacher", family.expected_layout(),
                          cfg.model.revision, hub_patterns(family, cfg.model.use_t5))


def _prediction(cfg: Config, family: Family, parts: PipelineParts) -> str:
    """model.prediction_type, else what the checkpoint's scheduler says, else the family default."""
    if cfg.model.prediction_type:
        return cfg.model.prediction_type
    if family.kind == "sd3":
        return "flow"
    return parts.scheduler_config.get("prediction_type", family.default_prediction)


def _denoiser(family: Family, model: nn.Module, schedule: Schedule) -> nn.Module:
    if family.kind == "sd3":
        return MMDiTDenoiser(model, schedule)
    return UNetDenoiser(model, schedule, added_conds=family.kind == "sdxl")


def student_net(cfg: Config, teacher_model: nn.Module, family: Family, schedule: Schedule, folder: Path) -> LazyNet:
    """The recipe of a trainable fp32 copy of the teacher (Algorithm 1 init), with LoRA when configured."""

    def build() -> nn.Module:
        model = type(teacher_model).from_config(teacher_model.config)  # fp32: the default dtype
        model.train()
        model.requires_grad_(True)
        if cfg.engine.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        net = _denoiser(family, model, schedule)
        return add_lora(net, cfg.model.lora) if cfg.model.lora.enabled else net

    return LazyNet(build, SafetensorsWeights(folder / family.denoiser_folder, torch.float32, prefix="model."))


def teacher_net(template: nn.Module, family: Family, schedule: Schedule, folder: Path, dtype: torch.dtype) -> LazyNet:
    """The recipe of the frozen teacher in ``dtype``, for an engine that shards it."""

    def build() -> nn.Module:
        # cast through the wrapper: diffusers' own ``to`` warns about fp32 modules even where there are none
        return freeze(_denoiser(family, type(template).from_config(template.config), schedule).to(dtype))

    return LazyNet(build, SafetensorsWeights(folder / family.denoiser_folder, dtype, prefix="model."))


def _discriminator(cfg: Config, family: Family, cache_dir: Path, dtype: torch.dtype) -> nn.Module:
    if family.tiny and not cfg.model.sam:
        folder, width = ensure_tiny_sam(cache_dir), 32
    else:
        folder = resolve_source(cfg.model.sam or family.default_sam, "model.sam",
                                "a transformers SamModel or SamVisionModel folder")
        width = 256
    backbone = SamBackbone.from_pretrained(folder, cfg.model.sam_taps or None, dtype)
    if cfg.engine.sam_checkpointing:
        backbone.enable_checkpointing()
    return PixelGANDiscriminator(backbone, width)


def _reward(cfg: Config, family: Family, teacher_dir: Path, cache_dir: Path, dtype: torch.dtype) -> nn.Module | None:
    if cfg.model.reward_model:
        folder = resolve_source(cfg.model.reward_model, "model.reward_model",
                                "an LRM folder (see flashdmd/nets/reward.py)")
    elif family.tiny:
        folder = ensure_tiny_lrm(family, teacher_dir, cache_dir)
    else:
        return None
    style = "sd15" if family.kind == "sd15" else "sdxl"
    return freeze(LatentRewardModel.load(folder, teacher_dir, style, resolution=family.resolution, dtype=dtype))


def build_parts(cfg: Config, cache_dir: Path, lazy: bool | None = None) -> Parts:
    """Every network of ``cfg.model.family`` by role (spec 1.1), ready for the algorithm and engine;
    ``lazy`` (default: a sharded engine) leaves the students on the meta device for the engine to fill."""
    if cfg.model.family == "gmm2d":
        from flashdmd.nets.gmm2d import build_gmm_parts

        return build_gmm_parts(cfg, cache_dir)
    family = get_family(cfg.model.family)
    cache_dir = Path(cfg.model.cache_dir or cache_dir)
    dtype = DTYPES[cfg.model.dtype]
    folder = _teacher_folder(cfg, family, cache_dir)
    lazy = cfg.engine.kind in ("fsdp", "deepspeed") if lazy is None else lazy
    lazy_teacher = lazy and cfg.engine.teacher_sharding == "zero3"
    raw = load_pipeline_folder(folder, family, dtype, cfg.model.use_t5, cfg.model.vae, cfg.model.text_encoders,
                               denoiser_weights=not lazy_teacher)
    schedule = family.schedule(_prediction(cfg, family, raw))
    if raw.vae.dtype == torch.float16 and raw.vae.config.force_upcast:
        raw.vae.to(torch.float32)  # the SD/SDXL VAEs overflow in fp16 (diffusers' force_upcast)

    if lazy_teacher:
        teacher = meta_module(teacher_net(raw.denoiser, family, schedule, folder, dtype))
    else:
        teacher = freeze(_denoiser(family, raw.denoiser, schedule))
    make = meta_module if lazy else materialize
    generator = make(student_net(cfg, raw.denoiser, family, schedule, folder))
    fake_score = make(student_net(cfg, raw.denoiser, family, schedule, folder))
    decoder = freeze(VAEDecoder(raw.vae, cfg.engine.decode_micro_batch, cfg.engine.decoder_checkpointing))
    text = PromptEncoder(
        family.kind, raw.text_encoders, raw.tokenizers, cfg.data.resolution,
        force_zeros_for_empty_prompt=bool(raw.index.get("force_zeros_for_empty_prompt", True)), t5=raw.t5,
        t5_tokenizer=raw.t5_tokenizer, t5_length=T5_LENGTH if family.tiny else 256,
        joint_dim=int(getattr(raw.denoiser.config, "joint_attention_dim", 0) or 0))
    reward = _reward(cfg, family, folder, cache_dir, dtype)

    def encode_prompts(prompts: list[str]) -> Conditioning:
        cond = text(prompts)
        return {**cond, **reward.tokenize(list(prompts))} if reward is not None else cond

    def null_cond(n: int) -> Conditioning:
        cond = text.null(n)
        return {**cond, **reward.tokenize([""] * n)} if reward is not None else cond

    return with_mode_discriminator(cfg, Parts(  # dmd2 mode: DMD2's classifier replaces the Pixel-GAN
        family=family.name, schedule=schedule, latent_shape=family.latent_shape(cfg.data.resolution),
        teacher=teacher, generator=generator, fake_score=fake_score, decoder=decoder,
        discriminator=_discriminator(cfg, family, cache_dir, dtype), encode_prompts=encode_prompts,
        null_cond=null_cond, reward=reward, encode_images=decoder.encode,
        extras={"text_encoder": text, "family_spec": family, "teacher_dir": folder,
                "scaling_factor": decoder.scaling, "shift_factor": decoder.shift,
                "student_timesteps": list(family.student_timesteps)},
    ))
