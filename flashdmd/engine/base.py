"""The engine interface the algorithm uses (DESIGN.md, "engines" layer).

The algorithm sees networks by role name ("generator", "fake_score", "discriminator" trainable;
"teacher", "decoder", "reward", "reference", ... frozen) and asks the engine to run backward,
step, EMA and reduce metrics. Local, FSDP2 and DeepSpeed ZeRO-3 implement it; the algorithm
never knows which one it runs under.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn


@dataclass
class OptimSpec:
    """AdamW with warm-up and a schedule, per trainable network (spec 1.6 [INF]: DMD2's optimiser)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    total_steps: int = 1
    grad_clip: float = 10.0


class Engine(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def setup(self, trainable: dict[str, nn.Module], optim: dict[str, OptimSpec], frozen: dict[str, nn.Module]) -> None:
        """Wrap the networks: trainable ones get an optimizer and scheduler, frozen ones none."""

    @abstractmethod
    def __getitem__(self, name: str) -> nn.Module:
        """The (possibly wrapped) module to call forward on."""

    @abstractmethod
    def backward(self, name: str, loss: Tensor) -> None:
        """Back-propagate ``loss`` for the trainable network ``name``."""

    @abstractmethod
    def step(self, name: str) -> dict[str, float]:
        """Clip, optimizer step, scheduler step, zero grad; returns {"grad_norm", "lr"}."""

    @abstractmethod
    def zero_grad(self, name: str) -> None: ...

    @abstractmethod
    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        """Inside: the named trainable networks pass gradients through but collect none
        (the generator's GAN loss through the discriminator, DeepSpeed issue #4923)."""

    @abstractmethod
    def ema_(self, target: str, source: str, decay: float) -> None:
        """target <- decay * target + (1 - decay) * source, shard by shard (spec 1.7, Eq. 11)."""

    @abstractmethod
    def all_reduce_mean(self, value: Tensor) -> Tensor: ...

    @abstractmethod
    def save(self, step_dir: Path) -> None:
        """Collective: every trainable network, optimizer and scheduler into ``step_dir``."""

    @abstractmethod
    def load(self, step_dir: Path) -> None:
        """Collective: restore what ``save`` wrote."""

    @abstractmethod
    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        """Collective: full (unsharded) weights of ``name`` on rank 0, {} elsewhere."""
