"""The ``data`` section: WebDataset shards, batch sizes, resumable epochs, the bad-sample policy."""
from __future__ import annotations

from dataclasses import dataclass

from flashdmd.config.errors import ConfigError
from flashdmd.config.rules import Bound, Scope, setting


@dataclass
class DataConfig:
    shards: str = ""  # WebDataset URLs: brace pattern, local paths or pipe: commands
    latent_shards: bool = False  # shards carry precomputed VAE latents (no image decoding)
    prompts: str = ""  # text/JSONL prompt list for generator inputs; "" -> shard captions
    resolution: int = setting(64, ge=8, le=8192)
    batch_size: int = setting(2, ge=1, le=65536)  # per rank
    # > 0: batch_size = global_batch_size / world size at start-up (spec 1.9's global batch on any GPU count)
    global_batch_size: int = setting(0, ge=0, le=2**24)
    real_batch_size: int = setting(0, ge=0, le=65536)  # per rank, real images for the discriminator; 0 -> batch_size
    workers: int = setting(0, ge=0, le=512)
    shuffle_buffer: int = setting(100, ge=0, le=10**8)
    resampled: bool = True  # resampled shards with an epoch length: equal batches on every rank
    epoch_length: int = setting(1000, ge=1)  # batches per epoch per rank (both modes; equal on every rank)
    aspect_buckets: bool = False
    max_bad_fraction: float = setting(0.05, ge=0, le=1)  # abort when more than this fraction of samples is bad
    bad_check_after: int = setting(100, ge=1)  # the bad fraction is judged once this many samples were read (per worker)
    # [C, h, w] of shard latents; [] -> C of the first, h = w = resolution / 8
    latent_shape: list[int] = setting([], item=Bound(ge=1, le=65536))

    def per_rank(self, world_size: int) -> int:
        """The per-rank batch on ``world_size`` ranks: ``batch_size``, or the global batch's share."""
        if self.global_batch_size <= 0:
            return self.batch_size
        if self.global_batch_size % world_size:
            fits = [n for n in range(1, self.global_batch_size + 1) if self.global_batch_size % n == 0]
            raise ConfigError(f"data.global_batch_size={self.global_batch_size} is not a multiple of the world size "
                              f"{world_size} (nodes x gpus_per_node); run on one of {fits} GPUs or change the "
                              f"global batch")
        return self.global_batch_size // world_size

    def validate(self, rules: Scope) -> None:
        rules.check(self.resolution % 8 == 0, "resolution", "must be a positive multiple of 8 (the VAE downsamples by 8)")
        rules.check(len(self.latent_shape) in (0, 3), "latent_shape", "must be [] or [C, h, w]")
        rules.check(self.latent_shards or not self.latent_shape, ("latent_shape", "latent_shards"),
                    "is only read from latent shards", "set data.latent_shards=true or data.latent_shape=[]")
