"""The ``synth`` section: the synthetic training set job (flashdmd/apps/synth.py).

Paper section 5: the student is trained on images a stronger teacher generated (SD3.5-Large at
28 steps, CFG 4.5), then curated.  Steps and CFG are the paper's; everything else is [INF].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashdmd.config.rules import Scope, setting

# per-image scores of flashdmd/eval/ that can curate the set (the Frechet distances are set-level)
FilterMetric = Literal["", "clip_score", "pickscore", "hpsv2", "image_reward"]


@dataclass
class SynthConfig:
    prompts: str = ""  # text/JSONL prompt file or prompt shards (flashdmd.data.prompts); the job needs it
    pipeline: str = ""  # any diffusers text-to-image pipeline: local folder or hub id; "" -> the preset's teacher
    num_images: int = setting(0, ge=0)  # 0 -> every prompt once; more cycles the prompts, each image its own seed
    steps: int = setting(28, ge=1, le=1000)  # paper section 5: SD3.5-Large at 28 steps
    guidance: float = setting(4.5, ge=0, le=100)  # paper section 5: CFG 4.5
    resolution: int = setting(0, ge=0, le=8192)  # square side in pixels; 0 -> the pipeline's default [INF]
    seed: int = setting(0, ge=0)  # image i uses seed + i, whatever rank makes it [INF]
    batch_size: int = setting(4, ge=1, le=4096)  # images per pipeline call
    per_shard: int = setting(1000, ge=1, le=1_000_000)  # images generated per shard (kept ones are written) [INF]
    out_dir: str = ""  # shards go to <out_dir>/synth-NNNNNN.tar; "" -> <run dir>/shards
    image_format: Literal["png", "jpg", "webp"] = "png"  # [INF] lossless by default
    latents: bool = False  # also write k.latent.safetensors, encoded by the student family's VAE
    text_embeddings: bool = False  # also write k.text.safetensors (the student family's text encoders)
    dtype: Literal["", "fp32", "bf16", "fp16"] = ""  # the pipeline's dtype; "" -> model.dtype
    filter_metric: FilterMetric = ""  # "" keeps every image; else keep images scoring >= filter_threshold
    filter_threshold: float = setting(0.0, ge=-1e6, le=1e6)
    filter_weights: str = ""  # the filter metric's weights (local path or hub id); "" -> its default
    grid_size: int = setting(16, ge=0, le=256)  # images in the MLflow sample grid (0: no grid)

    def validate(self, rules: Scope) -> None:
        unused = self.filter_threshold != 0.0 or bool(self.filter_weights)
        rules.check(
            bool(self.filter_metric) or not unused,
            ("filter_threshold", "filter_weights", "filter_metric"),
            "is only read when synth.filter_metric names a score",
            "set synth.filter_metric or drop them",
        )
