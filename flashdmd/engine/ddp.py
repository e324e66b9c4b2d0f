"""The local engine across processes: every rank holds full replicas, DDP averages gradients
("local: one process, or DDP across processes").

Everything but placement comes from ``LocalEngine``: the optimizers, schedules, EMA and the
checkpoint layout. What changes: forward runs on a ``DistributedDataParallel`` wrapper; a
network inside ``frozen`` is called unwrapped, so DDP's reducer does not wait for gradients
that are never produced (the generator's GAN loss through the discriminator); metrics are
averaged over ranks; rank 0 alone writes the (identical) replicas and returns full weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flashdmd.engine import common
from flashdmd.engine.local import LocalEngine


class DDPEngine(LocalEngine):
    kind = "ddp"

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DDPEngine needs an initialised process group (torch.distributed.init_process_group)")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        super().__init__(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._frozen_now: set[str] = set()

    def _wrap(self, name: str, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def __getitem__(self, name: str) -> nn.Module:
        if name in self._frozen_now:
            return self.modules[name]
        return super().__getitem__(name)

    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        previous = set(self._frozen_now)
        self._frozen_now |= set(names)
        try:
            with super().frozen(*names):
                yield
        finally:
            self._frozen_now = previous

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        return common.all_reduce_mean(value, self.device)

    def save(self, step_dir: Path) -> None:
        if self.rank == 0:
            super().save(step_dir)
        dist.barrier()

    def load(self, step_dir: Path) -> None:
        super().load(step_dir)
        dist.barrier()

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        return super().full_state_dict(name) if self.rank == 0 else {}
