"""Networks built without their weights, filled later from safetensors straight into each rank's shard.

DESIGN.md "scale is a design input": no rank ever materialises a full trainable network. A
``LazyNet`` is a recipe (``build``: construct the module in whatever device context is active)
plus where its tensors come from (``SafetensorsWeights``: parameter name -> file and key, read
whole or by a range of rows, cast to the master dtype). The registry hands the engine a module
built on the meta device (``meta_module``) and the engine fills it where it lives:

- FSDP2 (``flashdmd.engine.fsdp``): ``fully_shard`` on the meta module, ``to_empty`` on the
  device, then ``fill_dtensor_shards`` copies each rank's rows of every tensor from the files;
- DeepSpeed ZeRO-3 (``flashdmd.engine.deepspeed``): ``build`` runs again inside
  ``deepspeed.zero.Init`` (each module's parameters are partitioned as soon as it is
  constructed), then ``fill_zero3_partitions`` reads each rank's flat range of every tensor;
- one process (local / DDP): ``materialize`` allocates on the CPU and reads every tensor whole.

All three read the same bytes and cast them the same way, so a sharded load equals a
single-process load bit for bit. Parameters that no file holds are LoRA adapters: small, they
get real storage and PEFT's own initialisation at build time (``meta_module``) and rank 0's
values are copied into every shard (``remember_memory_tensors``); any other missing tensor is an
error naming it.

A source is anything with ``has(name)`` / ``read(name, rows)`` over module tensor names
(``Weights``): a teacher folder (``SafetensorsWeights``), a stage-1 hand-over read through
``flashdmd.engine.checkpoint_reader`` (``flashdmd.train.handoff``), several of them in order
(``LayeredWeights``: a LoRA hand-over's adapters over the teacher's base weights) or one cast to
another dtype (``CastWeights``: the stage-2 reference policy in the compute dtype).
"""
from __future__ import annotations

import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

_SOURCES: "weakref.WeakKeyDictionary[nn.Module, LazyNet]" = weakref.WeakKeyDictionary()


class Weights(ABC):
    """Where a network's tensors come from, by module tensor name (parameters and persistent buffers)."""

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether this source holds tensor ``name``."""

    @abstractmethod
    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """Tensor ``name`` (or only its ``rows`` along dim 0), in this source's dtype."""

    def read_flat(self, name: str, shape: torch.Size, start: int, stop: int) -> Tensor:
        """Elements ``start:stop`` of the flattened tensor, reading only the rows that hold them."""
        if len(shape) < 2:
            return self.read(name).reshape(-1)[start:stop]
        row = shape.numel() // shape[0]
        first, last = start // row, -(-stop // row)
        return self.read(name, slice(first, last)).reshape(-1)[start - first * row:stop - first * row]


class SafetensorsWeights(Weights):
    """The tensors of one diffusers/transformers component folder (single file or sharded index)."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, prefix: str = "") -> None:
        folder = Path(folder)
        self.dtype, self.prefix = dtype, prefix
        self.where: dict[str, Path] = {}
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            for key, name in json.loads(indexes[0].read_text())["weight_map"].items():
                self.where[key] = folder / name
        else:
            files = [f for f in sorted(folder.glob("*.safetensors")) if f.name.count(".") == 1]  # no fp16 variants
            if not files:
                raise FileNotFoundError(f"no .safetensors weights in '{folder}' (a diffusers component folder)")
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    self.where.update({key: file for key in f.keys()})

    def key(self, name: str) -> str | None:
        """The file key of module tensor ``name`` (adapter prefix and PEFT's ``base_layer`` removed)."""
        key = name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name
        key = key.replace(".base_layer.", ".")
        return key if key in self.where else None

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """Tensor ``name`` (or only its ``rows`` along dim 0), cast to the master dtype."""
        key = self.key(name)
        if key is None:
            raise KeyError(f"the weights folder has no tensor for '{name}' (a model.teacher folder of another "
                           f"architecture?)")
        with safe_open(str(self.where[key]), framework="pt") as f:
            if rows is None:
                tensor = f.get_tensor(key)
            else:
                tensor = f.get_slice(key)[rows]
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


class LayeredWeights(Weights):
    """Several sources in order: each tensor comes from the first one that holds it."""

    def __init__(self, *layers: Weights) -> None:
        self.layers = layers

    def has(self, name: str) -> bool:
        return any(layer.has(name) for layer in self.layers)

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        holder = next((layer for layer in self.layers if layer.has(name)), self.layers[-1])
        return holder.read(name, rows)  # none holds it: the last (the teacher folder) says what is missing


class CastWeights(Weights):
    """A source with its floating tensors cast to ``dtype`` after reading (from the source's dtype,
    so the values are those of a network loaded from ``base`` and then converted)."""

    def __init__(self, base: Weights, dtype: torch.dtype) -> None:
        self.base, self.dtype = base, dtype

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        tensor = self.base.read(name, rows)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


@dataclass
class LazyNet:
    """How to build one network and where its weights are."""

    build: Callable[[], nn.Module]
    weights: Weights
    memory: dict[str, Tensor] = field(default_factory=dict)  # tensors held in memory (set by the FSDP fill)


def source_of(module: nn.Module) -> LazyNet | None:
    """The recipe of a module made by ``meta_module`` (None for an ordinary module)."""
    return _SOURCES.get(module)


def meta_module(net: LazyNet) -> nn.Module:
    """``net`` built on the meta device (no storage at all), remembered with its recipe."""
    with torch.device("meta"):
        module = net.build()
    _materialize_adapters(module)
    _SOURCES[module] = net
    return module


def _lora_layers(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if callable(getattr(m, "reset_lora_parameters", None)))


def _materialize_adapters(module: nn.Module) -> None:
    """LoRA adapters are small and not in any file: give them real CPU storage and PEFT's init."""
    for layer in _lora_layers(module):
        for name in ("lora_A", "lora_B"):
            getattr(layer, name).to_empty(device="cpu")
        for adapter in list(layer.lora_A):
            layer.reset_lora_parameters(adapter, True)


def named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and persistent buffers, the tensors a state dict (and a weights file) holds."""
    persistent = set(module.state_dict(keep_vars=True))
    return [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if n in persistent]


def check_buffers(module: nn.Module) -> None:
    """A non-persistent buffer on the meta device has no source: construction must compute it."""
    persistent = set(module.state_dict(keep_vars=True))
    lost = [n for n, b in module.named_buffers() if b.is_meta and n not in persistent]
    if lost:
        raise ValueError(f"meta-device construction loses the non-persistent buffers {lost[:3]}; build this "
                         f"network whole (engine.kind=local)")


@torch.no_grad()
def materialize(net: LazyNet) -> nn.Module:
    """The network on the CPU with every tensor read whole (the single-process load)."""
    module = meta_module(net)
    check_buffers(module)
    keep = {n: t.detach().clone() for n, t in named_tensors(module) if not t.is_meta}
    module.to_empty(device="cpu")
    for name, tensor in named_tensors(module):
        tensor.copy_(_value(net, keep, name, None))
    _SOURCES.pop(module, None)
    return module


@torch.no_grad()
def remember_memory_tensors(module: nn.Module, net: LazyNet) -> None:
    """Before sharding: CPU copies of the tensors that are real already (LoRA adapters), rank 0's
    on every rank (each rank drew its own; the shards must come from one draw, as DDP does)."""
    import torch.distributed as dist

    net.memory = {n: t.detach().to("cpu", copy=True) for n, t in named_tensors(module) if not t.is_meta}
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        for name, tensor in net.memory.items():
            moved = tensor.to(device)
            dist.broadcast(moved, src=0)
            net.memory[name] = moved.cpu()


@torch.no_grad()
def fill_dtensor_shards(module: nn.Module, net: LazyNet) -> None:
    """FSDP2: copy this rank's rows of every tensor (plain tensors whole) from the files."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, tensor in named_tensors(module):
        if isinstance(tensor, DTensor):
            shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            local = tensor.to_local()
            rows = slice(offset[0], offset[0] + shape[0]) if len(shape) else None
            if local.numel() == 0:
                continue
            local.copy_(_value(net, net.memory, name, rows).reshape(local.shape))
        else:
            tensor.copy_(_value(net, net.memory, name, None))
    net.memory = {}


def _value(net: LazyNet, memory: dict[str, Tensor], name: str, rows: slice | None) -> Tensor:
    """Tensor ``name`` from the files, else (a LoRA adapter no file holds) from ``memory``; a
    hand-over's adapters are in its file and win over the fresh initialisation."""
    if net.weights.has(name) or name not in memory:
        return net.weights.read(name, rows)
    return memory[name] if rows is None else memory[name][rows]


@torch.no_grad()
def fill_zero3_partitions(module: nn.Module, weights: Weights, rank: int) -> dict[str, nn.Parameter]:
    """ZeRO-3: copy this rank's flat range of every file-backed parameter into its partition;
    returns the parameters no file holds, by name (filled from ``LazyNet.memory`` under a gather)."""
    missing = {}
    for name, param in module.named_parameters():
        if not weights.has(name):
            missing[name] = param
            continue
        part = param.ds_tensor
        size = part.ds_numel
        start = rank * size
        stop = min(start + size, param.ds_numel)
        if stop > start:
            part.narrow(0, 0, stop - start).copy_(weights.read_flat(name, param.ds_shape, start, stop))
    for name, buf in module.named_buffers():
        if weights.has(name):
            buf.copy_(weights.read(name))
    return missing

