"""The map every step directory carries: per trainable network, where each tensor lives.

DESIGN.md: "Every step directory carries its own map (names, shapes, dtypes, slices), so any tool
can read it on one CPU process and any world size can resume from it." Each engine's ``save``
writes ``<step>/<network>.map.json`` on rank 0, one of three layouts:

- ``full`` (local, DDP): ``<network>.safetensors`` holds every tensor whole.
- ``dcp`` (FSDP2): ``<network>/`` is a torch.distributed.checkpoint folder in Hugging Face
  safetensors storage; each rank's file names its tensors ``model.<key>`` and records in its
  header (``DCP_SHARDING_INFO``) the offsets of its chunk, so the map lists names, global shapes
  and dtypes and the files hold the slices.
- ``zero3`` (DeepSpeed ZeRO-3): rank r's ``<network>/rank<r>.safetensors`` holds flat sub-group
  partitions ``fp32.<g>`` (fp32 masters) and ``state.<g>.<moment>`` (Adam moments). ZeRO-3 splits
  every parameter's flattened values into ``W`` equal pieces of ``partition = ceil(numel / W)``
  (the last one zero-padded) and packs a rank's pieces of sub-group g one after another, so the
  map records per tensor its sub-group ``group``, its ``offset`` inside every rank's flat
  partition and ``partition``. Buffers are whole, in ``<network>/buffers.safetensors``.

Only JSON and safetensors: nothing here is pickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flashdmd.engine.state_io import load_json, save_json

MAP_SUFFIX = ".map.json"
FORMAT = 1
LAYOUTS = ("full", "dcp", "zero3")


def map_path(step_dir: Path | str, network: str) -> Path:
    return Path(step_dir) / f"{network}{MAP_SUFFIX}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_entry(t: Tensor, **extra: Any) -> dict[str, Any]:
    return {"shape": [int(s) for s in t.shape], "dtype": dtype_name(t.dtype), **extra}


def write_map(step_dir: Path | str, network: str, engine: str, layout: str, world_size: int,
              tensors: dict[str, dict[str, Any]], **extra: Any) -> Path:
    """Write the map of ``network`` (rank 0 only; the caller decides)."""
    if layout not in LAYOUTS:
        raise ValueError(f"checkpoint map layout must be one of {LAYOUTS}, got {layout!r}")
    path = map_path(step_dir, network)
    save_json(path, {"format": FORMAT, "network": network, "engine": engine, "layout": layout,
                     "world_size": world_size, "tensors": tensors, **extra})
    return path


def read_map(step_dir: Path | str, network: str) -> dict[str, Any]:
    data = load_json(map_path(step_dir, network))
    if data.get("format") != FORMAT or data.get("layout") not in LAYOUTS:
        raise ValueError(f"{map_path(step_dir, network)}: unknown checkpoint map (format {data.get('format')!r}, "
                         f"layout {data.get('layout')!r}); written by a newer flashdmd?")
    return data


def zero3_partition(numel: int, world_size: int) -> int:
    """Elements of one parameter on each rank under ZeRO-3: ceil(numel / world_size)."""
    return -(-numel // world_size)


def zero3_entries(module: nn.Module, sub_groups: list[list[nn.Parameter]]) -> dict[str, dict[str, Any]]:
    """Map entries of the trainable parameters of a ZeRO-3 ``module`` from the optimizer's sub-groups
    (``DeepSpeedZeroOptimizer_Stage3.fp16_groups``), in the order their partitions are packed."""
    names = {id(p): n for n, p in module.named_parameters()}
    entries: dict[str, dict[str, Any]] = {}
    for g, params in enumerate(sub_groups):
        offset = 0
        for p in params:
            part = int(p.partition_numel())
            shape = [int(s) for s in p.ds_shape]
            entries[names[id(p)]] = {"shape": shape, "dtype": "float32", "group": g, "offset": offset, "partition": part}
            offset += part
    return entries


def zero3_local_slice(full_flat: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s ZeRO-3 piece of a flattened tensor, zero-padded to the partition size."""
    part = zero3_partition(full_flat.numel(), world_size)
    piece = full_flat[rank * part:(rank + 1) * part]
    if piece.numel() < part:
        piece = torch.cat([piece, piece.new_zeros(part - piece.numel())])
    return piece
