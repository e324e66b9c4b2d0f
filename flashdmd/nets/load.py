"""Loading a family's networks from a diffusers folder or a hub id (real and tiny weights alike).

Real checkpoints (a local diffusers folder, or a hub id fetched with ``huggingface_hub``) and the
tiny presets' cached folders go through ``load_pipeline_folder``: it checks the folder is the
family's pipeline layout (``model_index.json`` ``_class_name`` and subfolders) and then loads each
component with its own ``from_pretrained``. A wrong path or another family's folder fails here,
before any weights are read, with a message naming the path and the expected layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashdmd.config.sources import is_local_path, local_path
from flashdmd.nets.families import KIND_OF_PIPELINE, Family

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LayoutError(ValueError):
    """A weights folder that is missing or is not the expected layout; the message says what to fix."""


def hub_patterns(family: Family, use_t5: bool) -> list[str]:
    """Files of a hub pipeline repo this family needs: configs, tokenizers and safetensors of the
    used subfolders, never the root single-file checkpoints nor T5 unless asked (SD3's T5 is ~9 GB)."""
    subs = [family.denoiser_folder, "vae", "scheduler", *family.text_folders,
            *(f.replace("text_encoder", "tokenizer") for f in family.text_folders)]
    if use_t5:
        subs += ["text_encoder_3", "tokenizer_3"]
    return ["model_index.json"] + [f"{sub}/*.{ext}" for sub in subs for ext in ("json", "txt", "model", "safetensors")]


def resolve_source(source: str, what: str, layout: str, revision: str = "",
                   allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a hub id downloaded (or found in the hub cache); errors name ``what``."""
    if not source:
        raise LayoutError(f"{what} is empty; give a local folder or a hub id holding {layout}")
    if is_local_path(source):
        path = local_path(source)
        if not path.is_dir():
            found = "is a file, not a folder" if path.is_file() else "does not exist"
            raise LayoutError(f"{what}: folder '{path}' {found}; expected {layout}")
        return path
    from huggingface_hub import snapshot_download

    try:
        # fp16 variants duplicate the full-precision files; from_pretrained reads the latter
        return Path(snapshot_download(source, revision=revision or None, allow_patterns=allow_patterns,
                                      ignore_patterns=["*.fp16.safetensors"] if allow_patterns else None))
    except Exception as err:  # network, auth or unknown repo: all need the same user action
        raise LayoutError(f"{what}: could not fetch hub id '{source}' ({type(err).__name__}: {err}); "
                          f"download it first or give a local folder holding {layout}") from err


def check_pipeline_folder(folder: Path, family: Family, need: list[str], what: str = "model.teacher") -> dict[str, Any]:
    """model_index.json of ``folder``, after checking it is ``family``'s layout with subfolders ``need``."""
    layout = family.expected_layout()
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise LayoutError(f"{what}: '{folder}' has no model_index.json; expected {layout}")
    index = json.loads(index_path.read_text())
    found = index.get("_class_name", "")
    if found != family.pipeline_class:
        other = KIND_OF_PIPELINE.get(found)
        hint = (f" (a folder of family '{other}'; set model.family={other} or point to a {family.kind} folder)"
                if other else "")
        raise LayoutError(f"{what}: '{folder}' holds a {found or 'unnamed'} pipeline{hint}, but model.family="
                          f"{family.name} expects {layout}")
    missing = [sub for sub in need if not (folder / sub).is_dir()]
    if missing:
        raise LayoutError(f"{what}: '{folder}' lacks {', '.join(s + '/' for s in missing)}; expected {layout}")
    return index


@dataclass
class PipelineParts:
    """The raw diffusers/transformers objects of one pipeline folder."""

    folder: Path
    index: dict[str, Any]
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    t5: nn.Module | None = None
    t5_tokenizer: Any = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)


def load_pipeline_folder(folder: Path, family: Family, dtype: torch.dtype = torch.float32, use_t5: bool = False,
                         vae_source: str = "", text_sources: list[str] | None = None,
                         denoiser_weights: bool = True) -> PipelineParts:
    """Load denoiser, VAE, CLIP encoders (+ SD3's T5 when ``use_t5``) and tokenizers from ``folder``.

    ``vae_source`` / ``text_sources`` replace the folder's own VAE / text encoders (e.g. the
    fp16-fix SDXL VAE); each is a folder holding that one component. Without
    ``denoiser_weights`` the denoiser is built from its config on the meta device (no weights
    read, default dtype): a template for networks that a sharded engine fills (``flashdmd.nets.lazy``).
    """
    import diffusers
    import transformers

    need = [family.denoiser_folder, "vae", *family.text_folders,
            *(f.replace("text_encoder", "tokenizer") for f in family.text_folders)]
    if use_t5:
        if family.kind != "sd3":
            raise LayoutError(f"model.use_t5 applies to SD3 only, not model.family={family.name}")
        need += ["text_encoder_3", "tokenizer_3"]
    index = check_pipeline_folder(folder, family, need)

    def component(sub: str, override: str = "") -> Any:
        library, cls_name = index[sub]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        if sub == family.denoiser_folder and not denoiser_weights:
            with torch.device("meta"):
                return cls.from_config(cls.load_config(folder, subfolder=sub))
        if override:
            path = resolve_source(override, f"replacement {sub}", f"a {cls_name} folder")
            return cls.from_pretrained(path, torch_dtype=dtype)
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=dtype)

    text_sources = text_sources or []
    if text_sources and len(text_sources) != len(family.text_folders):
        raise LayoutError(f"model.text_encoders must list {len(family.text_folders)} folders for {family.name} "
                          f"({', '.join(family.text_folders)}), got {len(text_sources)}")
    encoders = [component(sub, text_sources[i] if text_sources else "") for i, sub in enumerate(family.text_folders)]
    tokenizers = [transformers.AutoTokenizer.from_pretrained(folder, subfolder=sub.replace("text_encoder", "tokenizer"))
                  for sub in family.text_folders]
    sched_path = folder / "scheduler" / "scheduler_config.json"
    return PipelineParts(
        folder=folder, index=index, denoiser=component(family.denoiser_folder), vae=component("vae", vae_source),
        text_encoders=encoders, tokenizers=tokenizers,
        t5=component("text_encoder_3") if use_t5 else None,
        t5_tokenizer=transformers.AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3") if use_t5 else None,
        scheduler_config=json.loads(sched_path.read_text()) if sched_path.is_file() else {},
    )


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter takes gradients (frozen nets of spec 1.1)."""
    module.eval()
    module.requires_grad_(False)
    return module

