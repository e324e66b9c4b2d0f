"""Allocated bytes on the CPU, counted per storage (the CPU allocator keeps no statistics).

``AllocationLog`` is a TorchDispatchMode: it sees every tensor an aten op creates, follows each
new storage until it is freed (a finalizer on the storage) and keeps the order of allocations
and frees, so a test can take the peak of the live total leaving out storages it names.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationLog(TorchDispatchMode):
    """Every storage created by an aten op inside, with the order of allocations and frees."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (+bytes | -bytes, storage key)
        self.live: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.events.append((-self.live.pop(key), key))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and not t.is_meta and type(t) is Tensor:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.events.append((storage.nbytes(), key))
                    weakref.finalize(storage, self._freed, key)
        return out

    def peak(self, exclude: set[int]) -> int:
        total = best = 0
        for delta, key in self.events:
            if key not in exclude:
                total += delta
                best = max(best, total)
        return best
