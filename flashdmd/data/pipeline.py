"""Image (or precomputed-latent) batches from WebDataset shards, split by rank and worker, resumable.

The pipeline of one logical worker ``l`` of rank ``r`` (research note anchors_jobsystem.md section 3):

    shard URLs -> endless shard sequence for (r, l) -> tar samples -> shuffle buffer
               -> decode (image: resize + center crop; latent: no image bytes read) -> batches of B

Shard sequence, two modes (``data.resampled``):

- deterministic: pass ``p`` is a permutation of all shards seeded by (seed, p), the same on every
  rank; rank r takes ``perm[r::world_size]``, worker l of it ``[l::workers]`` (webdataset's
  split_by_node then split_by_worker). Ranks and workers read disjoint shards within a pass. Needs
  at least world_size x workers shards.
- resampled: shards drawn with replacement (webdataset's ResampledShards), seeded by (seed,
  restart, rank, worker); each (rank, worker) draws from its own slice of the shard list when there
  are enough shards, else from all of them.

Deterministic passes are per worker: a worker with fewer samples starts its next pass sooner, so
"each sample exactly once per epoch" does not hold across workers (that needs an indexed reader
such as wids; research note section 3). Both streams are endless, so every rank yields exactly ``data.epoch_length`` batches per epoch and
no rank waits in a collective for one that ran dry (webdataset #188, #225). Batch ``g`` of a rank
comes from logical worker ``g % workers``: a DataLoader in its default in-order mode takes batches
from its workers round-robin, and physical worker ``j`` of a loader started at batch ``g0`` serves
logical worker ``(g0 + j) % workers``, so the order is the same after a mid-epoch resume.

Departure from the diffusers LCM-WDS anchor: our own tar grouper and loop instead of a
``wds.DataPipeline`` chain, because the position (``raw`` samples per worker) and the per-reason
bad-sample accounting need every sample to pass through code that can count it.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flashdmd.config import Config
from flashdmd.data.bad_samples import BadSamples, DataError
from flashdmd.data.decode import BadSample, decode_caption, decode_image, decode_latent
from flashdmd.data.format import CAPTION_EXTS, IMAGE_EXTS, LATENT_EXTS
from flashdmd.data.position import DataPosition
from flashdmd.data.shards import RawSample, check_shards, read_shard

log = logging.getLogger("flashdmd.data")

VAE_FACTOR = 8  # spatial downsampling of the SD1.5 / SDXL / SD3 VAEs


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker process needs to rebuild its stream (picklable)."""

    urls: tuple[str, ...]
    deterministic: bool
    seed: int
    restart: int
    rank: int
    world_size: int
    workers: int  # logical workers, >= 1
    batch_size: int
    resolution: int
    shuffle_buffer: int
    latent: bool
    latent_shape: tuple[int, ...] | None
    max_bad_fraction: float
    bad_check_after: int

    def rng(self, purpose: str, *parts: int) -> random.Random:
        """A generator seeded by the run seed, the purpose and ``parts``; resampled mode adds the restart."""
        restart = () if self.deterministic else (self.restart,)
        return random.Random(":".join(str(x) for x in (purpose, self.seed, *restart, *parts)))


def shard_sequence(spec: StreamSpec, worker: int) -> Iterator[str]:
    """The endless shard URLs of logical ``worker`` of ``spec.rank`` (see the module docstring)."""
    urls = list(spec.urls)
    parts = spec.world_size * spec.workers
    if spec.deterministic:
        epoch = 0
        while True:
            perm = list(urls)
            spec.rng("shards", epoch).shuffle(perm)  # not rank-dependent: all ranks split one permutation
            yield from perm[spec.rank :: spec.world_size][worker :: spec.workers]
            epoch += 1
    pool = urls[spec.rank :: spec.world_size][worker :: spec.workers] if len(urls) >= parts else urls
    rng = spec.rng("shards", spec.rank, worker)
    while True:
        yield pool[rng.randrange(len(pool))]


def shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer (webdataset's ``shuffle``): keep ``size`` items, emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _wanted(latent: bool):
    exts = (LATENT_EXTS if latent else IMAGE_EXTS) + CAPTION_EXTS
    return lambda ext: ext in exts


def _decode(spec: StreamSpec, raw: RawSample, latent_shape: tuple[int, ...] | None) -> tuple[str, torch.Tensor]:
    caption = decode_caption(raw)
    if not spec.latent:
        return caption, decode_image(raw, spec.resolution)
    latent = decode_latent(raw, None)
    side = spec.resolution // VAE_FACTOR
    expected = latent_shape or (latent.shape[0], side, side)
    if tuple(latent.shape) != tuple(expected):
        raise BadSample("wrong_latent_shape", f"got {list(latent.shape)}, expected {list(expected)}")
    return caption, latent


def worker_batches(spec: StreamSpec, worker: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Endless batches of logical ``worker``; the first ``skip`` shuffled raw samples are passed over
    undecoded (a deterministic resume). Each batch carries ``_meta`` for the position and bad counts."""
    bad = BadSamples(spec.max_bad_fraction, spec.bad_check_after, where=f"rank {spec.rank} worker {worker}")
    bad.active = skip == 0
    raw_samples = (s for url in shard_sequence(spec, worker) for s in read_shard(url, bad, _wanted(spec.latent)))
    latent_shape = spec.latent_shape
    keys: list[str] = []
    captions: list[str] = []
    tensors: list[torch.Tensor] = []
    for index, raw in enumerate(shuffled(raw_samples, spec.shuffle_buffer, spec.rng("shuffle", spec.rank, worker)), 1):
        if index <= skip:
            bad.active = index == skip
            continue
        try:
            caption, tensor = _decode(spec, raw, latent_shape)
        except BadSample as err:
            bad.bad(err.reason, raw.key, raw.shard, err.detail)
            continue
        bad.ok()
        if spec.latent and latent_shape is None:
            latent_shape = tuple(tensor.shape)  # the first good latent fixes C for this worker
        keys.append(raw.key)
        captions.append(caption)
        tensors.append(tensor)
        if len(keys) == spec.batch_size:
            meta = {"worker": worker, "raw": index, "bad": dict(bad.counts), "seen": bad.seen, "last_shard": dict(bad.last_shard)}
            yield {"latent" if spec.latent else "image": torch.stack(tensors), "caption": captions, "key": keys, "_meta": meta}
            keys, captions, tensors = [], [], []


class _RankStreams(IterableDataset):
    """The rank's logical workers as one IterableDataset; DataLoader worker j runs one of them."""

    def __init__(self, spec: StreamSpec, first_batch: int, skips: list[int]):
        super().__init__()
        self.spec, self.first_batch, self.skips = spec, first_batch, skips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.spec.workers:
            raise DataError(f"the stream was planned for {self.spec.workers} workers but runs in {n}")
        if info is not None:
            torch.set_num_threads(1)  # decoding is per-sample work; threads would only oversubscribe the CPUs
        worker = (self.first_batch + j) % self.spec.workers
        yield from worker_batches(self.spec, worker, self.skips[worker])


class ShardLoader:
    """Batches of one rank: ``iter(loader)`` yields the rest of the current epoch (``len(loader)``
    batches per full epoch); ``loader.position`` is the live DataPosition to checkpoint;
    ``loader.bad_counts()`` the bad items per reason over the whole run."""

    def __init__(self, spec: StreamSpec, position: DataPosition, epoch_length: int, num_workers: int):
        self.spec, self.position, self.epoch_length, self.num_workers = spec, position, epoch_length, num_workers
        self._base_bad = Counter(position.bad)
        self._base_seen = position.seen
        self._live: dict[int, dict[str, Any]] = {}
        self._loader: DataLoader | None = None
        self._it: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = self._stream()
        try:
            for _ in range(self.epoch_length - self.position.batches % self.epoch_length):
                batch = next(it)
                self._account(batch.pop("_meta"), len(batch["key"]))
                yield batch
        except Exception:
            del it  # the traceback keeps this frame: drop the iterator so its workers stop now, not at exit
            self.close()
            raise

    def bad_counts(self) -> dict[str, int]:
        return dict(self.position.bad)

    def close(self) -> None:
        """Stop the worker processes (the loader restarts them from its position if iterated again)."""
        self._it = None
        self._loader = None
        self._base_bad, self._base_seen, self._live = Counter(self.position.bad), self.position.seen, {}

    def _stream(self) -> Iterator[dict[str, Any]]:
        if self._it is None:
            dataset = _RankStreams(self.spec, self.position.batches, list(self.position.raw))
            if self.num_workers == 0:
                self._it = iter(dataset)
            else:
                self._loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2)
                self._it = iter(self._loader)
        return self._it

    def _account(self, meta: dict[str, Any], n: int) -> None:
        pos = self.position
        pos.batches += 1
        pos.samples += n
        pos.raw[meta["worker"]] = meta["raw"]
        self._live[meta["worker"]] = meta
        bad = Counter(self._base_bad)
        last_shard: dict[str, str] = {}
        for live in self._live.values():
            bad.update(live["bad"])
            last_shard.update(live["last_shard"])
        pos.bad = dict(bad)
        pos.seen = self._base_seen + sum(live["seen"] for live in self._live.values())
        BadSamples(
            self.spec.max_bad_fraction,
            self.spec.bad_check_after,
            where=f"rank {self.spec.rank}",
            counts=bad,
            seen=pos.seen,
            good=pos.seen - sum(bad.values()),
            last_shard=last_shard,
        ).check()


def build_image_loader(
    cfg: Config, rank: int, world_size: int, position: DataPosition | None = None, batch_size: int | None = None
) -> ShardLoader:
    """Batches for ``rank`` of ``world_size`` from ``cfg.data.shards``, continuing ``position`` if given.

    Each batch: ``image`` float [B, 3, R, R] in [-1, 1] (or, with ``data.latent_shards``, ``latent``
    [B, C, h, w] and no image decoding), ``caption`` list[str], ``key`` list[str]; B = ``batch_size``
    or data.batch_size (pass data.real_batch_size for the discriminator's real images).
    Raises DataError before any data is read when the shard list is empty or cannot be split.
    """
    data = cfg.data
    if data.aspect_buckets:
        raise DataError("data.aspect_buckets=true is not implemented; set data.aspect_buckets=false (resize + center crop)")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    urls = check_shards(cfg)
    workers = max(1, data.workers)
    mode = "resampled" if data.resampled else "deterministic"
    if mode == "deterministic" and len(urls) < world_size * workers:
        raise DataError(
            f"data.shards={data.shards!r} has {len(urls)} shards, fewer than world_size x data.workers = "
            f"{world_size} x {workers}: some workers would get no data. Write more, smaller shards "
            "(data_tools/make_shards.py --maxcount), lower data.workers, or set data.resampled=true"
        )
    if position is None:
        pos = DataPosition.start(mode, cfg.seed, rank, world_size, workers)
    else:
        pos = position.resumed(mode, cfg.seed, rank, world_size, workers)
    spec = StreamSpec(
        urls=tuple(urls),
        deterministic=mode == "deterministic",
        seed=cfg.seed,
        restart=pos.restart,
        rank=rank,
        world_size=world_size,
        workers=workers,
        batch_size=batch_size or data.batch_size,
        resolution=data.resolution,
        shuffle_buffer=data.shuffle_buffer,
        latent=data.latent_shards,
        latent_shape=tuple(data.latent_shape) or None,
        max_bad_fraction=data.max_bad_fraction,
        bad_check_after=data.bad_check_after,
    )
    return ShardLoader(spec, pos, data.epoch_length, data.workers)
