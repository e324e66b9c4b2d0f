"""The shard format: what one sample of a flashdmd WebDataset shard holds.

A shard is a POSIX tar file (optionally gzip-compressed); the members that share a basename up to
the first dot form one sample, in the order they appear (WebDataset convention, research note
anchors_jobsystem.md section 3). For a sample with key ``k`` (globally unique across shards, e.g.
``"000123"`` or ``"laion-0042-000123"``; no dots and no slashes):

==========================  ======================================================================
member                      content
==========================  ======================================================================
``k.jpg`` / ``.jpeg`` /     the image, any size, any mode PIL reads (converted to RGB). Exactly
``.png`` / ``.webp``        one of these; image shards must have it, latent shards may omit it.
``k.txt``                   the caption, UTF-8. If absent, ``json["caption"]`` (or ``"text"``,
                            ``"prompt"``) is the caption.
``k.json``                  metadata: ``width``, ``height`` (of the original image), ``source``
                            (file or URL it came from), optionally ``caption``; latent shards add
                            ``vae`` (the VAE id or folder), ``scaling_factor``, ``shift_factor``
                            and ``latent_shape``.
``k.latent.npy`` or         optional precomputed VAE latent [C, h, w], float16/float32, already
``k.latent.safetensors``    shifted and scaled: ``(mean(posterior) - shift_factor) * scaling_factor``,
                            i.e. exactly the tensor the denoiser consumes. safetensors holds one
                            tensor named ``latent``. ``.npy`` is read with ``allow_pickle=False``.
``k.text.safetensors``      optional precomputed text embeddings (named tensors of the family's text
                            encoders); reserved, not read by the loaders yet.
==========================  ======================================================================

Prompt-only shards (stage 2, evaluation) hold ``k.txt`` (or ``k.json`` with a caption) and nothing
else; plain text (one prompt a line) or JSONL (``{"prompt": ...}`` or ``{"caption": ...}``) prompt
lists are read by ``flashdmd.data.prompts.load_prompts`` as well.

A sample's members must be adjacent in the tar. Plain ``tar`` writes directory order, so make
shards from a folder with ``tar --sort=name -cf shard.tar -C folder .`` (GNU tar); a shard whose
members are interleaved is skipped and counted as ``ungrouped_tar``.

Shard names use brace notation for sets: ``/data/laion-{000000..000127}.tar``. The loaders also take
a directory (all ``*.tar`` in it), several patterns joined by ``::``, and ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/x-000001.tar -``).
"""
from __future__ import annotations

import json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXTS = ("latent.npy", "latent.safetensors")
CAPTION_EXTS = ("txt", "json")
CAPTION_JSON_FIELDS = ("caption", "text", "prompt")


def split_member_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """``dir/000123.latent.npy`` -> (``dir/000123``, ``latent.npy``); names without a dot -> (None, None)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


def caption_of(files: dict[str, bytes]) -> str:
    """The sample's caption from ``txt`` or from the json metadata; "" when there is none."""
    if "txt" in files:
        return files["txt"].decode("utf-8").strip()
    if "json" in files:
        meta = json.loads(files["json"])
        for name in CAPTION_JSON_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(name), str):
                return meta[name].strip()
    return ""


def image_ext(files: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in files), None)
