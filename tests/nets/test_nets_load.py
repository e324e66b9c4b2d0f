"""Loading errors name the path and the expected layout; real families go through the same loader."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flashdmd.config import load_config
from flashdmd.nets.families import get_family
from flashdmd.nets.load import LayoutError, load_pipeline_folder, resolve_source
from flashdmd.nets.registry import build_parts
from flashdmd.nets.tiny import ensure_tiny_teacher


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "nets-cache"


def test_missing_path_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sdxl"
    cfg = load_config("sdxl-4step", [f"model.teacher={missing}"])
    with pytest.raises(LayoutError) as err:
        build_parts(cfg, tmp_path)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "StableDiffusionXLPipeline" in msg and "unet/" in msg and "text_encoder_2/" in msg


def test_other_family_folder_is_named(cache: Path, tmp_path: Path) -> None:
    sdxl_folder = ensure_tiny_teacher(get_family("tiny-sdxl"), cache)
    cfg = load_config("sd3-medium-4step", [f"model.teacher={sdxl_folder}"])
    with pytest.raises(LayoutError) as err:
        build_parts(cfg, tmp_path)
    msg = str(err.value)
    assert str(sdxl_folder) in msg and "family 'sdxl'" in msg
    assert "StableDiffusion3Pipeline" in msg and "transformer/" in msg


def test_missing_subfolder_and_no_index(cache: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ensure_tiny_teacher(get_family("tiny-sd15"), cache), broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(LayoutError, match=r"lacks vae/"):
        load_pipeline_folder(broken, get_family("sd15"))
    (broken / "model_index.json").unlink()
    with pytest.raises(LayoutError, match="no model_index.json"):
        load_pipeline_folder(broken, get_family("sd15"))


def test_real_family_loads_a_local_folder_through_the_same_path(cache: Path, tmp_path: Path) -> None:
    """A real-family config pointed at a (tiny) diffusers folder loads exactly like real weights."""
    folder = ensure_tiny_teacher(get_family("tiny-sd15"), cache)
    sam = tmp_path / "sam"
    from flashdmd.nets.tiny import ensure_tiny_sam

    shutil.copytree(ensure_tiny_sam(cache), sam)
    cfg = load_config("sd15-4step", [f"model.teacher={folder}", f"model.sam={sam}", "data.resolution=64"])
    parts = build_parts(cfg, tmp_path)
    assert parts.family == "sd15" and parts.reward is None and parts.latent_shape == (4, 8, 8)
    assert parts.extras["scaling_factor"] == pytest.approx(0.18215)
    assert len(parts.discriminator.heads) == 4 and parts.discriminator.heads[0].out.in_features == 256


def test_tiny_family_rejects_teacher_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.teacher must be empty"):
        build_parts(load_config("tiny-sdxl", ["model.teacher=/some/folder"]), tmp_path)
    with pytest.raises(ValueError, match="v_prediction"):
        build_parts(load_config("tiny-sd3", ["model.prediction_type=v_prediction"]), tmp_path)
    with pytest.raises(ValueError, match="model.family.*sd9"):
        build_parts(load_config("tiny-sdxl", ["model.family=sd9"]), tmp_path)


def test_hub_id_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LayoutError, match="could not fetch hub id 'nobody/not-a-model'"):
        resolve_source("nobody/not-a-model", "model.teacher", "a diffusers folder")


def test_hub_patterns_fetch_only_needed_files() -> None:
    import fnmatch

    from flashdmd.nets.load import hub_patterns

    files = ["model_index.json", "sd3_medium.safetensors", "transformer/diffusion_pytorch_model.safetensors",
             "transformer/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/merges.txt",
             "text_encoder_3/model-00001-of-00002.safetensors", "tokenizer_3/spiece.model", "vae/model.onnx"]

    def fetched(use_t5: bool) -> set[str]:
        patterns = hub_patterns(get_family("sd3"), use_t5)
        return {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}

    without = fetched(False)
    assert without == {"model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                       "transformer/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/merges.txt"}
    assert fetched(True) == without | {"text_encoder_3/model-00001-of-00002.safetensors", "tokenizer_3/spiece.model"}


def test_gmm2d_is_delegated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flashdmd.nets.gmm2d as gmm2d

    seen = []
    monkeypatch.setattr(gmm2d, "build_gmm_parts", lambda cfg, cache_dir: seen.append((cfg.model.family, cache_dir)))
    build_parts(load_config("gmm2d"), tmp_path)
    assert seen == [("gmm2d", tmp_path)]
