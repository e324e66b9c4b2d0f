"""The generator EMA for evaluation and export (spec 6 #20 [INF]; the update is spec 1.7's Eq. 11):
fp32 shadow copies of one trainable network's tensors, held the way this rank holds the network.

The shadow covers the tensors that train (``common.trainable_parameters``: with LoRA the adapters
and any unfrozen tensor, as the fake-score pull, spec 1.7 [INF]); buffers and frozen tensors are
the network's own, so a reader puts the shadow over the network's weights. Each engine keeps its
shadow in its own layout and updates it with ``common.ema_update_`` on what the rank holds, with
no collective: the EMA of a shard is the shard of the EMA.

- ``FullShadow`` (local, DDP): whole tensors; rank 0 writes ``<step>/<name>_ema.safetensors``
  and its map (layout ``full``).
- ``flashdmd.engine.shadow_dcp.DTensorShadow`` (FSDP2): DTensors sharded like the parameters.
- ``flashdmd.engine.shadow_zero3.Zero3Shadow`` (ZeRO-3): this rank's pieces of the fp32 masters.

Each one checkpoints as one more network ``<name>_ema`` of the step directory, with the writer and
map of its engine's networks, so ``CheckpointReader``, consolidate and the apps read it like any
network, and ``load`` rebuilds this rank's pieces from full tensors: a step directory of any
engine and world size resumes, and the stage-2 run continues the EMA of the stage-1 hand-over.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from flashdmd.engine import common
from flashdmd.engine.checkpoint_map import tensor_entry, write_map
from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.engine.state_io import save_tensors

SUFFIX = "_ema"  # the shadow of network "generator" is network "generator_ema" of a step directory
log = logging.getLogger("flashdmd.engine")


def shadow_name(network: str) -> str:
    return f"{network}{SUFFIX}"


class Shadow(ABC):
    """The EMA of network ``network``'s trainable tensors on this rank (see module doc)."""

    def __init__(self, network: str, module: nn.Module, decay: float, shards: common.ShardView) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"generator EMA decay must be in [0, 1), got {decay}")
        self.network, self.module, self.decay, self.shards = network, module, decay, shards
        self.tensors: dict[str, Tensor] = {}
        self.reset_()

    @property
    def name(self) -> str:
        return shadow_name(self.network)

    def reset_(self) -> None:
        """Restart the EMA at the network's current weights."""
        self.tensors = {k: self._piece(p) for k, p in common.trainable_parameters(self.module)}

    @torch.no_grad()
    def update_(self) -> None:
        """psi <- decay psi + (1 - decay) theta on this rank's pieces (spec 1.7, Eq. 11)."""
        common.ema_update_(self.tensors, self.module, self.decay, shards=self.shards)

    @torch.no_grad()
    def load_full_(self, full: Callable[[str], Tensor], keys: Iterable[str], where: str) -> None:
        """Set every piece from the full tensors ``full(key)``, read one at a time (a step
        directory of any engine and world size, or a hand-over)."""
        missing, extra = set(self.tensors) - set(keys), set(keys) - set(self.tensors)
        if missing or extra:
            raise ValueError(f"{where}: the saved {self.name} does not fit network {self.network!r} (lacks "
                             f"{sorted(missing)[:5]}, has unexpected {sorted(extra)[:5]}); model.family or "
                             "model.lora differ from the run that wrote it")
        for key in sorted(self.tensors):
            self._set_piece(key, full(key))

    def load(self, folder: Path) -> None:
        """Collective: restore from a step directory or a hand-over folder; one without this
        shadow (the EMA switched on for a resumed run, a hand-over of a run without it) starts it
        at the network's current weights, and says so."""
        reader = CheckpointReader(folder)
        if self.name not in reader.networks():
            log.warning("%s has no %s: the EMA starts at the current %s weights", folder, self.name, self.network)
            self.reset_()
            return
        self.load_full_(lambda k: reader.tensor(self.name, k), reader.keys(self.name), str(folder))

    def _piece(self, param: Tensor) -> Tensor:
        """A new fp32 copy of this rank's piece of ``param``, in the layout the shadow keeps (the
        parameter itself is that piece for whole tensors and FSDP2's DTensors)."""
        return param.detach().to(torch.float32, copy=True)

    @abstractmethod
    def _set_piece(self, key: str, full: Tensor) -> None:
        """Overwrite this rank's piece of ``key`` from the full tensor (shape checked)."""

    @abstractmethod
    def save(self, step_dir: Path) -> None:
        """Collective: write the shadow as network ``<name>_ema`` of ``step_dir``, with its map."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, Tensor]:
        """Collective: the full EMA tensors on rank 0 (CPU, fp32), {} elsewhere."""


def check_shape(where: str, key: str, full: Tensor, shape: Iterable[int]) -> None:
    if tuple(full.shape) != tuple(shape):
        raise ValueError(f"{where}: EMA tensor {key} has shape {tuple(full.shape)}, the network's is {tuple(shape)}")


class FullShadow(Shadow):
    """Whole tensors on every rank (local engine, DDP replicas: every replica moves alike)."""

    def __init__(self, network: str, module: nn.Module, decay: float, engine: str, rank: int, world_size: int) -> None:
        self.engine, self.rank, self.world_size = engine, rank, world_size
        super().__init__(network, module, decay, _whole)

    def _set_piece(self, key: str, full: Tensor) -> None:
        piece = self.tensors[key]
        check_shape(self.name, key, full, piece.shape)
        piece.copy_(full)

    def save(self, step_dir: Path) -> None:
        if self.rank != 0:
            return
        save_tensors(Path(step_dir) / f"{self.name}.safetensors", self.tensors)
        write_map(step_dir, self.name, self.engine, "full", self.world_size,
                  {k: tensor_entry(v) for k, v in self.tensors.items()})

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.tensors.items()} if self.rank == 0 else {}


def _whole(name: str, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The shadow tensor and the whole parameter (replicas hold every tensor whole)."""
    return p, q.data
