"""Tiny presets: the real diffusers/transformers classes with tiny configs, saved once per cache folder.

DESIGN.md toy world 2. ``ensure_tiny_teacher`` writes a complete diffusers pipeline folder (the
pipeline's own ``save_pretrained``, so the layout is exactly what a downloaded checkpoint has) and
``flashdmd.nets.load`` reads it back through the same code that loads real weights. The tokenizer
is built locally (a byte-level CLIP BPE vocabulary without merges: every character is a token),
so nothing is downloaded. ``ensure_tiny_sam`` and ``ensure_tiny_lrm`` do the same for the
Pixel-GAN backbone and the latent reward model.

Folders are keyed by a hash of everything that shapes them (this file's text, which holds every
tiny config, the diffusers/transformers versions and the family), written to a temporary folder and renamed into place, so concurrent ranks and reruns
reuse one copy. Weights are random but seeded, hence identical across machines.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from flashdmd.nets.families import Family

TOKEN_LENGTH = 16  # tiny CLIP context length (real CLIP: 77)
TRAINED_LOGIT_SCALE = 100.0  # exp(tau) of the tiny LRM (CLIP's trained cap; see ensure_tiny_lrm)
T5_LENGTH = 8  # SD3's T5 slot length for tiny presets (diffusers default 256)
_TEXT_HIDDEN = 32


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode map (the alphabet of a byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _byte_chars():
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKEN_LENGTH)


def tiny_t5() -> tuple[Any, Any]:
    """SD3's optional third encoder: a tiny T5 encoder with a local Unigram (sentencepiece-style) vocabulary."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_LENGTH)
    config = T5Config(vocab_size=len(tokenizer), d_model=2 * _TEXT_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config), tokenizer


def _clip_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH, projection_dim=_TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(family: Family) -> Any:
    from diffusers import AutoencoderKL

    sd3 = family.kind == "sd3"
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=family.latent_channels,
        norm_num_groups=4, sample_size=family.resolution, scaling_factor=family.scaling_factor,
        shift_factor=family.shift_factor if sd3 else None, use_quant_conv=not sd3, use_post_quant_conv=not sd3,
        force_upcast=False,
    )


def tiny_unet(family: Family, in_channels: int | None = None) -> Any:
    """SD1.5-style (text only) or SDXL-style (text + pooled + time ids) tiny UNet."""
    from diffusers import UNet2DConditionModel

    channels = in_channels or family.latent_channels
    common = dict(sample_size=family.resolution // family.vae_downsample, in_channels=channels,
                  out_channels=channels, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    if family.kind == "sd15":
        return UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=8)
    return UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + _TEXT_HIDDEN,
                                cross_attention_dim=2 * _TEXT_HIDDEN)


def _sd3_transformer(family: Family) -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=family.resolution // family.vae_downsample, patch_size=2,
                                 in_channels=family.latent_channels, out_channels=family.latent_channels,
                                 num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                 joint_attention_dim=2 * _TEXT_HIDDEN, caption_projection_dim=32,
                                 pooled_projection_dim=2 * _TEXT_HIDDEN, pos_embed_max_size=32)


def tiny_teacher_pipeline(family: Family) -> Any:
    """The tiny family's diffusers pipeline object, seeded (identical weights on every build)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    vae = tiny_vae(family)
    if family.kind == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok, unet=tiny_unet(family),
            scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family.kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(_clip_config(tok)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer=tok, tokenizer_2=tok,
            unet=tiny_unet(family),
            scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012, timestep_spacing="leading", steps_offset=1))
    t5, t5_tok = tiny_t5()
    return diffusers.StableDiffusion3Pipeline(
        transformer=_sd3_transformer(family), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer_2=tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)


def tiny_sam_config() -> Any:
    from transformers import SamVisionConfig

    # 64 px / patch 8 -> an 8x8 token map, like SAM's 1024 / 16 -> 64x64 at 1/8 of the side.
    return SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1, 3], mlp_dim=64,
                           num_pos_feats=8, initializer_range=0.02)


def _cached(cache_dir: Path, name: str, key: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``cache_dir/<name>-<hash(key)>``, written by ``write`` into a temp dir and renamed atomically."""
    import diffusers
    import transformers

    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = {**key, "source": source, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    final = Path(cache_dir) / f"{name}-{digest[:12]}"
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; theirs is identical
            if not (final / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_teacher(family: Family, cache_dir: Path) -> Path:
    """The tiny family's diffusers pipeline folder (built on first use)."""
    if not family.tiny:
        raise ValueError(f"{family.name} is not a tiny family")
    key = {"family": family.name, "kind": family.kind, "res": family.resolution}
    return _cached(cache_dir, family.name, key, lambda d: tiny_teacher_pipeline(family).save_pretrained(d))


def ensure_tiny_sam(cache_dir: Path) -> Path:
    from transformers import SamVisionModel

    def write(folder: Path) -> None:
        torch.manual_seed(1)
        SamVisionModel(tiny_sam_config()).save_pretrained(folder)

    return _cached(cache_dir, "tiny-sam", {"config": tiny_sam_config().to_dict()}, write)


def ensure_tiny_lrm(family: Family, teacher_dir: Path, cache_dir: Path) -> Path:
    """A latent reward model initialised from the tiny teacher, as LPO initialises LRMs (spec 3.2)."""
    from flashdmd.nets.reward import LatentRewardModel

    def write(folder: Path) -> None:
        torch.manual_seed(2)
        # SD3's denoiser is an MMDiT; its LRM is a UNet on SD3 latents (flashdmd/nets/reward.py)
        unet = tiny_unet(family) if family.kind == "sd3" else None
        lrm = LatentRewardModel.from_base(teacher_dir, family, unet=unet)
        # a trained LRM's temperature has grown from CLIP's initial 14.3 toward its cap of 100;
        # at 14.3 the random tiny LRM spreads the K candidates' scores too little for stage
        # 2's threshold of 0.6 (spec 2.3) to keep any pair, at 100 it keeps about two thirds
        with torch.no_grad():
            lrm.logit_scale.fill_(math.log(TRAINED_LOGIT_SCALE))
        lrm.save(folder)

    return _cached(cache_dir, f"{family.name}-lrm", {"family": family.name, "teacher": str(teacher_dir),
                                                    "logit_scale": TRAINED_LOGIT_SCALE}, write)
