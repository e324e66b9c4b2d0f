"""Precompute VAE latents into new shards (format: flashdmd/data/format.py), so training with
``data.latent_shards=true`` never decodes an image nor runs the VAE encoder.

    python data_tools/encode_latents.py IN_PATTERN OUT_DIR --vae /models/sdxl/vae --resolution 1024
           [--format npy|safetensors] [--batch-size 16] [--device cuda] [--keep-images]
           [--rank R --world-size W]

Every input shard becomes one output shard with the same file name, holding per sample the
caption (txt), the json metadata plus ``vae``, ``scaling_factor``, ``shift_factor`` and
``latent_shape``, and ``latent.npy`` / ``latent.safetensors``: the posterior mean, shifted and
scaled, ``(mean - shift_factor) * scaling_factor`` (what the denoiser consumes). Input images get
the loaders' resize + center crop first. Ranks split the input shards (``shards[rank::world_size]``;
RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS are used when the flags are absent), so the tool runs
as one task per GPU. Bad input samples are skipped and reported as the loaders do.

Not done here: precomputed text embeddings (format key ``text.safetensors`` is reserved).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webdataset import TarWriter  # noqa: E402

from flashdmd.data.bad_samples import BadSamples  # noqa: E402
from flashdmd.data.decode import BadSample, decode_caption, decode_image  # noqa: E402
from flashdmd.data.format import IMAGE_EXTS, image_ext  # noqa: E402
from flashdmd.data.shards import RawSample, expand_shards, read_shard  # noqa: E402

Encoder = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, R, R] in [-1, 1] -> [B, C, h, w] scaled latents


def vae_encoder(vae: torch.nn.Module, device: str = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """The encode function of a diffusers AutoencoderKL and the facts recorded with its latents."""
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    vae = vae.to(device).eval()

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
        return ((mean - shift) * scale).float().cpu()

    return encode, {"scaling_factor": scale, "shift_factor": shift}


def _latent_member(latent: torch.Tensor, fmt: str) -> dict[str, bytes]:
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, latent.numpy())
        return {"latent.npy": buffer.getvalue()}
    return {"latent.safetensors": save_safetensors({"latent": latent.contiguous()})}


def encode_shard(url: str, out: Path, encode: Encoder, vae_meta: dict[str, Any], resolution: int,
                 fmt: str = "npy", batch_size: int = 16, keep_images: bool = False,
                 bad: BadSamples | None = None) -> int:
    """Encode one shard into ``out``; return the number of samples written."""
    bad = bad or BadSamples(check_after=sys.maxsize)
    written = 0
    pending: list[tuple[RawSample, str, torch.Tensor]] = []
    wanted = lambda ext: ext in IMAGE_EXTS or ext in ("txt", "json")  # noqa: E731

    def flush(writer: TarWriter) -> None:
        nonlocal written
        if not pending:
            return
        latents = encode(torch.stack([pixels for _, _, pixels in pending]))
        for (raw, caption, _), latent in zip(pending, latents):
            meta = json.loads(raw.files["json"]) if "json" in raw.files else {}
            meta = meta if isinstance(meta, dict) else {}
            meta.update(vae_meta, latent_shape=list(latent.shape), caption=caption)
            sample = {"__key__": raw.key, "txt": caption, "json": meta, **_latent_member(latent, fmt)}
            if keep_images:
                ext = image_ext(raw.files)
                sample[ext] = raw.files[ext]
            writer.write(sample)
            written += 1
        pending.clear()

    out.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(out / Path(url).name)) as writer:
        for raw in read_shard(url, bad, wanted):
            try:
                pending.append((raw, decode_caption(raw), decode_image(raw, resolution)))
            except BadSample as err:
                bad.bad(err.reason, raw.key, raw.shard, err.detail)
                continue
            bad.ok()
            if len(pending) == batch_size:
                flush(writer)
        flush(writer)
    return written


def _env_rank() -> tuple[int, int]:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    return int(rank), int(world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="input image shards (brace pattern, directory, ::-list)")
    parser.add_argument("out", type=Path, help="output folder for the latent shards")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (save_pretrained layout)")
    parser.add_argument("--subfolder", default="", help="e.g. 'vae' when --vae is a whole pipeline folder")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--format", choices=["npy", "safetensors"], default="npy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-images", action="store_true", help="copy the image member into the output too")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=None)
    args = parser.parse_args(argv)
    env_rank, env_world = _env_rank()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    if not 0 <= rank < world:
        parser.error(f"--rank {rank} must lie in [0, --world-size {world})")
    if not Path(args.vae).is_dir():
        parser.error(f"--vae {args.vae} is not a folder (a local diffusers AutoencoderKL; nothing is downloaded)")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.subfolder or None)
    encode, meta = vae_encoder(vae, args.device)
    meta["vae"] = str(Path(args.vae).resolve() / args.subfolder) if args.subfolder else str(Path(args.vae).resolve())
    urls = expand_shards(args.shards)
    if not urls:
        parser.error(f"{args.shards} matches no shard")
    bad = BadSamples(check_after=sys.maxsize, where=f"rank {rank}")
    total = 0
    for url in urls[rank::world]:
        total += encode_shard(url, args.out, encode, meta, args.resolution, args.format, args.batch_size,
                              args.keep_images, bad)
    print(f"rank {rank}/{world}: encoded {total} samples of {len(urls[rank::world])} shards into {args.out}; "
          f"skipped {sum(bad.counts.values())} {dict(bad.counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
