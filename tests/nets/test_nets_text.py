"""Prompt conditioning equals what the diffusers pipelines feed their denoisers (tiny models)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.nets.registry import build_parts
from flashdmd.nets.tiny import T5_LENGTH

PROMPTS = ["a photo of a cat", "a red car on a street, at night"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"


def _parts(family: str, cache: Path, *overrides: str):
    return build_parts(load_config(family, list(overrides)), cache)


def _pipeline(cls_name: str, parts):
    """The diffusers pipeline object built from the very components the family loaded."""
    import diffusers

    text = parts.extras["text_encoder"]
    enc, tok = list(text.encoders), text.tokenizers
    common = dict(vae=parts.decoder.vae, scheduler=None)
    if cls_name == "StableDiffusionXLPipeline":
        return diffusers.StableDiffusionXLPipeline(text_encoder=enc[0], text_encoder_2=enc[1], tokenizer=tok[0],
                                                   tokenizer_2=tok[1], unet=parts.teacher.model, **common)
    if cls_name == "StableDiffusion3Pipeline":
        return diffusers.StableDiffusion3Pipeline(transformer=parts.teacher.model, text_encoder=enc[0],
                                                  text_encoder_2=enc[1], tokenizer=tok[0], tokenizer_2=tok[1],
                                                  text_encoder_3=None, tokenizer_3=None, **common)
    return diffusers.StableDiffusionPipeline(text_encoder=enc[0], tokenizer=tok[0], unet=parts.teacher.model,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **common)


def test_sdxl_matches_pipeline(cache: Path) -> None:
    parts = _parts("tiny-sdxl", cache)
    pipe = _pipeline("StableDiffusionXLPipeline", parts)
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, null = parts.encode_prompts(PROMPTS), parts.null_cond(len(PROMPTS))
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled"], pooled)
    torch.testing.assert_close(null["encoder_hidden_states"], npe)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(null["pooled"], npooled)
    res = 64
    time_ids = pipe._get_add_time_ids((res, res), (0, 0), (res, res), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond["time_ids"], time_ids.repeat(len(PROMPTS), 1))
    torch.testing.assert_close(null["time_ids"], time_ids.repeat(len(PROMPTS), 1))
    assert pe.abs().sum() > 0 and npe.abs().sum() == 0


def test_sd3_matches_pipeline(cache: Path) -> None:
    parts = _parts("tiny-sd3", cache)
    pipe = _pipeline("StableDiffusion3Pipeline", parts)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
                                                  max_sequence_length=T5_LENGTH)
    cond, null = parts.encode_prompts(PROMPTS), parts.null_cond(len(PROMPTS))
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled"], pooled)
    torch.testing.assert_close(null["encoder_hidden_states"], npe)  # the empty prompt, encoded
    torch.testing.assert_close(null["pooled"], npooled)
    assert pe.shape == (2, 16 + T5_LENGTH, 64) and pooled.shape == (2, 64)


def test_sd3_with_t5_matches_pipeline(cache: Path) -> None:
    parts = _parts("tiny-sd3", cache, "model.use_t5=true")
    text = parts.extras["text_encoder"]
    assert text.t5 is not None
    pipe = _pipeline("StableDiffusion3Pipeline", parts)
    pipe.text_encoder_3, pipe.tokenizer_3 = text.t5, text.t5_tokenizer
    pe, npe, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
                                            max_sequence_length=T5_LENGTH)
    cond = parts.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(parts.null_cond(2)["encoder_hidden_states"], npe)
    assert cond["encoder_hidden_states"][:, 16:].abs().sum() > 0  # the T5 slot is filled, not zeros


def test_sd15_matches_pipeline(cache: Path) -> None:
    parts = _parts("tiny-sd15", cache)
    pipe = _pipeline("StableDiffusionPipeline", parts)
    pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(parts.encode_prompts(PROMPTS)["encoder_hidden_states"], pe)
    torch.testing.assert_close(parts.null_cond(2)["encoder_hidden_states"], npe)


def test_batched_encoding_and_precomputed(cache: Path) -> None:
    parts = _parts("tiny-sdxl", cache)
    text = parts.extras["text_encoder"]
    prompts = [f"prompt number {i}" for i in range(5)]
    full = text(prompts)
    text.batch_size = 2
    try:
        chunked = text(prompts)
    finally:
        text.batch_size = 64
    for key in full:
        torch.testing.assert_close(chunked[key], full[key])
    stored = {k: v.clone() for k, v in full.items()}
    assert set(text.precomputed(stored)) == {"encoder_hidden_states", "pooled", "time_ids"}
    with pytest.raises(ValueError, match="lacks"):
        text.precomputed({"encoder_hidden_states": full["encoder_hidden_states"]})
    with pytest.raises(ValueError, match="another model"):
        text.precomputed({**stored, "pooled": torch.zeros(5, 7)})
    with pytest.raises(ValueError, match="list of strings"):
        text("a bare string")


@pytest.mark.parametrize("flag", [None, False])
def test_sdxl_null_prompt_follows_model_index(flag: bool | None, cache: Path, tmp_path: Path) -> None:
    import json
    import shutil

    src = _parts("tiny-sdxl", cache).extras["teacher_dir"]
    folder = tmp_path / "sdxl"
    shutil.copytree(src, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("force_zeros_for_empty_prompt", None)
    if flag is not None:
        index["force_zeros_for_empty_prompt"] = flag
    (folder / "model_index.json").write_text(json.dumps(index))
    sam = tmp_path / "sam"
    from flashdmd.nets.tiny import ensure_tiny_sam

    shutil.copytree(ensure_tiny_sam(cache), sam)
    parts = build_parts(load_config("sdxl-4step", [f"model.teacher={folder}", f"model.sam={sam}",
                                                   "data.resolution=64"]), tmp_path)
    null = parts.null_cond(1)["encoder_hidden_states"]
    if flag is None:  # diffusers' default: zeros
        assert null.abs().sum() == 0
    else:
        torch.testing.assert_close(null, parts.encode_prompts([""])["encoder_hidden_states"])
