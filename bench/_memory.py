"""Peak bytes of live tensor storages during a block of code, on any device (CPU included).

A ``TorchDispatchMode`` sees every tensor an operator returns; each new storage is counted until
its Python object is collected (torch keeps one Python object per storage, so a weak reference
lives exactly as long as the storage). Storages that exist before the block (weights, optimizer
state, the batch) are not counted: the figure is the block's own working memory, activations
and gradients included. CUDA has ``max_memory_allocated``; this serves the CPU benchmarks.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out
