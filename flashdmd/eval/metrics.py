"""The metric registry for evaluation on prompt sets (spec section 5).

The implementations register themselves when ``flashdmd.eval`` is imported.

Every metric accumulates sufficient statistics as float64 tensors (``state``), so evaluation can
be sharded over ranks and nodes: the states are summed with one all-reduce each and ``compute``
gives the same number as a single pass over all images (up to summation order).

Images are ``[N, 3, H, W]`` tensors in [-1, 1] (what the samplers produce) with one prompt each.

``build_metrics`` loads each requested metric's weights from ``eval.weights[name]`` (a local
folder or hub id) or its default; a metric whose weights or code are unavailable is skipped with
a message naming what to install or configure, and the others still run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flashdmd.config import EvalConfig


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (weights or code missing); the message says what to provide."""


class Metric(ABC):
    """One metric over a set of (image, prompt) pairs."""

    name: str = ""

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] = {}

    @abstractmethod
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Add a batch: images [N, 3, H, W] in [-1, 1], one prompt per image."""

    @abstractmethod
    def compute(self) -> float:
        """The metric over everything added (after ``all_reduce`` on every rank, over all ranks)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Sufficient statistics, float64 sums: adding states adds image sets."""
        return self._state

    def merge(self, other: dict[str, torch.Tensor]) -> None:
        """Add another shard's state to this one."""
        for key, value in other.items():
            self._state[key] = self._state[key] + value.to(self._state[key])

    def all_reduce(self) -> None:
        """Sum the state over all ranks (no-op without an initialized process group)."""
        if dist.is_available() and dist.is_initialized():
            for value in self._state.values():
                dist.all_reduce(value)


def check_source(source: str) -> None:
    """A source that is written as a path must exist (otherwise it would be tried as a hub id)."""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise MetricUnavailable(f"weights folder {source} does not exist")


def check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"metrics expect images [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"metrics need one prompt per image: {images.shape[0]} images, {len(prompts)} prompts")


class MeanScore(Metric):
    """The mean of a per-image score."""

    def __init__(self) -> None:
        super().__init__()
        self._state = {"sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """One score per image, shape [N]."""

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        check_batch(images, prompts)
        scores = self.score(images, prompts).double().cpu()
        self._state["sum"] += scores.sum()
        self._state["count"] += scores.numel()

    def compute(self) -> float:
        count = float(self._state["count"])
        if count == 0:
            raise ValueError(f"{self.name}: no images were added")
        return float(self._state["sum"]) / count


Builder = Callable[[str, torch.device, EvalConfig], Metric]


@dataclass(frozen=True)
class MetricSpec:
    """A registry entry: how to build the metric from a weights source, and its table column."""

    build: Builder  # (weights source, device, eval config) -> metric
    default_source: str  # hub id, or "" when no public weights exist that flashdmd can load
    column: str  # header in the results table
    description: str
    digits: int = 4  # decimals in the results table
    needs_source: bool = True  # False: the builder explains itself when it cannot run


REGISTRY: dict[str, MetricSpec] = {}


def register(
    name: str, default_source: str, column: str, description: str, digits: int = 4, needs_source: bool = True
) -> Callable[[Builder], Builder]:
    """Decorator adding a metric builder to ``REGISTRY`` under ``name``."""

    def wrap(build: Builder) -> Builder:
        REGISTRY[name] = MetricSpec(build, default_source, column, description, digits, needs_source)
        return build

    return wrap


def build_metrics(cfg: EvalConfig, device: torch.device | str = "cpu") -> tuple[dict[str, Metric], dict[str, str]]:
    """Build ``cfg.metrics``: (built metrics by name, skip message by name).

    Weights come from ``cfg.weights[name]`` (local folder or hub id) or the metric's default.
    Unknown names are an error, not a skip: they are typos.
    """
    unknown = [n for n in cfg.metrics if n not in REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(unknown)} in eval.metrics; known: {', '.join(sorted(REGISTRY))}"
        )
    built, skipped = {}, {}
    for name in cfg.metrics:
        spec = REGISTRY[name]
        source = cfg.weights.get(name) or spec.default_source
        try:
            if not source and spec.needs_source:
                raise MetricUnavailable(f"no weights configured: set eval.weights.{name} to a local folder or hub id")
            metric = spec.build(source, torch.device(device), cfg)
        except MetricUnavailable as err:
            skipped[name] = f"{name} skipped: {err}"
            continue
        metric.name = name
        built[name] = metric
    return built, skipped
