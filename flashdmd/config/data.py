"""The ``data`` section: WebDataset shards, batch sizes, resumable epochs, the bad-sample policy."""
from __future__ import annotations

from dataclasses import dataclass

from flashdmd.algo.shares import split_batch
from flashdmd.config.errors import ConfigError
from flashdmd.config.rules import Bound, Scope, setting


@dataclass
class DataConfig:
    shards: str = ""  # WebDataset URLs: brace pattern, local paths or pipe: commands
    latent_shards: bool = False  # shards carry precomputed VAE latents (no image decoding)
    prompts: str = ""  # text/JSONL prompt list for generator inputs; "" -> shard captions
    resolution: int = setting(64, ge=8, le=8192)
    batch_size: int = setting(2, ge=1, le=65536)  # per rank
    # > 0: split over the ranks at start-up, unevenly when the world does not divide it (spec 1.9's
    # global batch on any GPU count; flashdmd/algo/shares.py), and batch_size becomes the rank's share
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

    def shares(self, world_size: int) -> list[int]:
        """Every rank's batch on ``world_size`` ranks: ``batch_size`` each, or the global batch split
        (the first ``global_batch_size % world_size`` ranks get one sample more, spec 1.9)."""
        if self.global_batch_size <= 0:
            return [self.batch_size] * world_size
        if self.global_batch_size < world_size:
            raise ConfigError(f"data.global_batch_size={self.global_batch_size} is smaller than the world size "
                              f"{world_size} (nodes x gpus_per_node): every rank needs at least one sample; run on at "
                              f"most {self.global_batch_size} GPUs or raise the global batch")
        return split_batch(self.global_batch_size, world_size)

    def per_rank(self, world_size: int, rank: int) -> int:
        """Rank ``rank``'s batch on ``world_size`` ranks: ``batch_size``, or its share of the global batch."""
        return self.shares(world_size)[rank]

    def validate(self, rules: Scope) -> None:
        rules.check(self.resolution % 8 == 0, "resolution", "must be a positive multiple of 8 (the VAE downsamples by 8)")
        rules.check(len(self.latent_shape) in (0, 3), "latent_shape", "must be [] or [C, h, w]")
        rules.check(self.latent_shards or not self.latent_shape, ("latent_shape", "latent_shards"),
                    "is only read from latent shards", "set data.latent_shards=true or data.latent_shape=[]")
