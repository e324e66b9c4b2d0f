"""Training batches for the algorithm (``flashdmd.algo.batch.Batch``) from the data layer.

Two sources behind one interface (``next_batch(step)``, ``state_dict()``):

- ``GMMBatches``: the exact toy world; generator "prompts" are empty conditionings and the
  discriminator's real pixels are decoded fresh true samples, drawn from (seed, step, rank), so
  the stream needs no position to resume.
- ``ImageBatches``: WebDataset shards (``flashdmd.data``); captions become the generator's prompts
  (or a separate prompt list when ``data.prompts`` is set), images the discriminator's real pixels
  (precomputed latents are decoded by the frozen VAE). Its positions go into every checkpoint.

Null conditionings for CFG are encoded once per batch size, not per step (no repeated
text encoding of fixed prompts).

Each rank draws its own share of the global batch (``data.batch_size`` after the trainer set it
from ``data.global_batch_size``, spec 1.9) and every batch carries all ranks' shares, so the
stage-1 losses can weight an uneven split exactly (flashdmd/algo/shares.py).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from flashdmd.algo.batch import Batch
from flashdmd.algo.rng import noise_generator
from flashdmd.config import Config
from flashdmd.data.pipeline import build_image_loader
from flashdmd.data.position import DataPosition
from flashdmd.data.prompts import build_prompt_loader
from flashdmd.nets.interfaces import Conditioning
from flashdmd.nets.parts import Parts


def _shares(cfg: Config, world_size: int) -> tuple[int, ...]:
    """Every rank's batch, or () when all are equal (no reweighting needed)."""
    shares = cfg.data.shares(world_size)
    return tuple(shares) if len(set(shares)) > 1 else ()


def _to(cond: Conditioning, device: torch.device) -> Conditioning:
    return {k: v.to(device) for k, v in cond.items()}


class GMMBatches:
    def __init__(self, cfg: Config, parts: Parts, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg, self.parts, self.rank, self.device = cfg, parts, rank, device
        self.gmm = parts.exact
        self.n, self.shares = cfg.data.per_rank(world_size, rank), _shares(cfg, world_size)

    def next_batch(self, step: int) -> Batch:
        n = self.n
        gen = noise_generator(self.cfg.seed, step, self.rank, "cpu", "real-data")
        x, _ = self.gmm.sample(n, gen)
        with torch.no_grad():
            real = self.parts.decoder(x.to(self.device))
        return Batch(cond={}, uncond={}, real=real, size=n, shares=self.shares)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def bad_counts(self) -> dict[str, int]:
        return {}


class ImageBatches:
    def __init__(self, cfg: Config, parts: Parts, rank: int, world_size: int, device: torch.device,
                 state: dict[str, Any] | None) -> None:
        self.cfg, self.parts, self.device = cfg, parts, device
        n, self.shares = cfg.data.per_rank(world_size, rank), _shares(cfg, world_size)
        state = state or {}
        images = DataPosition.from_state_dict(state["images"]) if "images" in state else None
        self.images = build_image_loader(cfg, rank, world_size, images, batch_size=n)
        self.prompts = None
        if cfg.data.prompts:
            prompts = DataPosition.from_state_dict(state["prompts"]) if "prompts" in state else None
            self.prompts = build_prompt_loader(cfg, rank, world_size, prompts, path=cfg.data.prompts, batch_size=n)
        self._image_it: Iterator[dict[str, Any]] | None = None
        self._prompt_it: Iterator[list[str]] | None = None
        self._uncond: dict[int, Conditioning] = {}

    def _next_images(self) -> dict[str, Any]:
        # the loader yields the rest of one epoch; a new iterator starts the next epoch
        for _ in range(2):
            if self._image_it is None:
                self._image_it = iter(self.images)
            try:
                return next(self._image_it)
            except StopIteration:
                self._image_it = None
        raise RuntimeError("the image loader produced an empty epoch; check data.epoch_length")

    def _next_prompts(self, fallback: list[str]) -> list[str]:
        if self.prompts is None:
            return fallback
        for _ in range(2):
            if self._prompt_it is None:
                self._prompt_it = iter(self.prompts)
            try:
                return next(self._prompt_it)
            except StopIteration:
                self._prompt_it = None
        raise RuntimeError("the prompt loader produced an empty epoch; check data.epoch_length")

    def _null(self, n: int) -> Conditioning:
        if n not in self._uncond:
            with torch.no_grad():
                self._uncond[n] = _to(self.parts.null_cond(n), self.device)
        return self._uncond[n]

    def next_batch(self, step: int) -> Batch:
        raw = self._next_images()
        prompts = self._next_prompts(raw["caption"])
        with torch.no_grad():
            cond = _to(self.parts.encode_prompts(list(prompts)), self.device)
            if "latent" in raw:
                real = self.parts.decoder(raw["latent"].to(self.device))
            else:
                real = raw["image"].to(self.device)
        return Batch(cond=cond, uncond=self._null(len(prompts)), real=real, size=len(prompts), shares=self.shares)

    def state_dict(self) -> dict[str, Any]:
        state = {"images": self.images.position.state_dict()}
        if self.prompts is not None:
            state["prompts"] = self.prompts.position.state_dict()
        return state

    def bad_counts(self) -> dict[str, int]:
        return self.images.bad_counts()


def build_batches(cfg: Config, parts: Parts, rank: int, world_size: int, device: torch.device,
                  state: dict[str, Any] | None = None) -> GMMBatches | ImageBatches:
    if parts.exact is not None:
        return GMMBatches(cfg, parts, rank, world_size, device)
    return ImageBatches(cfg, parts, rank, world_size, device, state)
