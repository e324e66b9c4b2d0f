"""One reader for every step directory of every engine, and for the ``final/`` hand-over.

``CheckpointReader(folder)`` assembles the full tensors of one network at a time on one CPU
process, from the map each step directory carries (``flashdmd.engine.checkpoint_map``): a
local/DDP file is read as is, FSDP2's torch.distributed.checkpoint chunks are placed at the
offsets their safetensors headers record, ZeRO-3's flat partitions are cut at the map's offsets
and joined over ranks. Tensors are read one by one (``tensors``), so peak memory is one network
(``state_dict``) or one tensor (``tensors``), never a whole step; from a hand-over, ``tensor``
reads a range of rows only (a rank's shard, ``flashdmd.train.handoff``). Nothing is unpickled: only
safetensors (``safe_open``) and JSON.

What it returns for a network is what training checkpointed for it: the trainable parameters
(fp32 masters under ZeRO-3) and the persistent buffers; frozen tensors (a discriminator's
backbone) are never checkpointed. ``optimizer_tensor`` gives one parameter's Adam moment, full,
which the engines use to re-partition a step directory at another world size.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from flashdmd.engine.checkpoint_map import MAP_SUFFIX, read_map

HANDOFF_META = "handoff.json"  # flashdmd.train.handoff.META (the reader sits a layer below it)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


class CheckpointReader:
    """Full tensors of the networks in a step directory or a hand-over folder (see module doc)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.folder} does not exist")
        self._maps: dict[str, dict[str, Any]] = {}
        self._dcp_index: dict[str, dict[str, list[tuple[Path, list[int]]]]] = {}

    # ---------------------------------------------------------------- what is there
    def networks(self) -> list[str]:
        """The networks this folder holds, by name."""
        meta = self.folder / HANDOFF_META
        if meta.is_file():
            return sorted(json.loads(meta.read_text())["networks"])
        found = sorted(p.name[: -len(MAP_SUFFIX)] for p in self.folder.glob(f"*{MAP_SUFFIX}"))
        if not found:
            raise FileNotFoundError(f"{self.folder} holds no checkpoint map (*{MAP_SUFFIX}) and no {HANDOFF_META}: "
                                    "not a flashdmd step directory or hand-over folder")
        return found

    def map(self, network: str) -> dict[str, Any]:
        """The network's map (layout, world size, per-tensor shape/dtype/slice)."""
        if network not in self._maps:
            if (self.folder / HANDOFF_META).is_file():
                self._maps[network] = self._full_map(network)
            else:
                if network not in self.networks():
                    raise KeyError(f"{self.folder} has no network {network!r}; it has {self.networks()}")
                self._maps[network] = read_map(self.folder, network)
        return self._maps[network]

    def _full_map(self, network: str) -> dict[str, Any]:
        path = self.folder / f"{network}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} has no {path.name} for network {network!r}")
        with safe_open(str(path), "pt") as f:
            tensors = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": _dtype_key(f.get_slice(k).get_dtype())}
                       for k in f.keys()}
        return {"layout": "full", "engine": "handoff", "world_size": 1, "tensors": tensors}

    def keys(self, network: str) -> list[str]:
        return sorted(self.map(network)["tensors"])

    # ---------------------------------------------------------------- full tensors
    def tensors(self, network: str, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """(key, full tensor) of ``network``, one at a time; ``dtype`` casts floating tensors."""
        for key in self.keys(network):
            t = self.tensor(network, key)
            yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    def tensor(self, network: str, key: str, rows: slice | None = None) -> Tensor:
        """The full tensor ``key`` of ``network``, or only its ``rows`` along dim 0: a ``full``
        file (the hand-over) reads just those rows, the sharded layouts assemble the tensor first."""
        layout = self.map(network)["layout"]
        if key not in self.map(network)["tensors"]:
            raise KeyError(f"{self.folder}: network {network!r} has no tensor {key!r}")
        if layout == "full":
            return self._full(network, key, rows)
        full = {"dcp": self._dcp, "zero3": self._zero3}[layout](network, key)
        return full if rows is None else full[rows]

    def state_dict(self, network: str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        return dict(self.tensors(network, dtype))

    def optimizer_tensor(self, network: str, key: str, moment: str) -> Tensor:
        """The full Adam moment ``moment`` (exp_avg, exp_avg_sq) of parameter ``key``."""
        layout = self.map(network)["layout"]
        if layout == "zero3":
            return self._zero3(network, key, f"state.{{g}}.{moment}")
        if layout == "dcp":
            return self._dcp(network, key, f"optim.state.{key}.{moment}")
        raise ValueError(f"{self.folder}: optimizer moments of layout {layout!r} are read by its engine, not here")

    # ---------------------------------------------------------------- layouts
    def _full(self, network: str, key: str, rows: slice | None = None) -> Tensor:
        with safe_open(str(self.folder / f"{network}.safetensors"), "pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]

    def _dcp(self, network: str, key: str, stored: str | None = None) -> Tensor:
        """Place every rank's chunk of ``model.<key>`` (or ``stored``) at its recorded offsets."""
        stored = stored or f"model.{key}"
        entry = self.map(network)["tensors"][key]
        chunks = self._dcp_chunks(network).get(stored)
        if not chunks:
            raise KeyError(f"{self.folder / network}: no chunk of {stored} in the DCP files")
        with safe_open(str(chunks[0][0]), "pt") as f:
            dtype = f.get_slice(stored).get_dtype()
        out = torch.empty(entry["shape"], dtype=_DTYPES[_dtype_key(dtype)])
        for path, offsets in chunks:
            with safe_open(str(path), "pt") as f:
                piece = f.get_tensor(stored)
            index = tuple(slice(o, o + s) for o, s in zip(offsets, piece.shape))
            out[index] = piece
        return out

    def _dcp_chunks(self, network: str) -> dict[str, list[tuple[Path, list[int]]]]:
        """stored key -> [(file, offsets)] from the DCP safetensors headers of ``network``."""
        if network not in self._dcp_index:
            index: dict[str, list[tuple[Path, list[int]]]] = {}
            for path in sorted((self.folder / network).glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    info = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
                    for k in f.keys():
                        offsets = info.get(k, {}).get("saved_offsets", [0] * len(f.get_slice(k).get_shape()))
                        index.setdefault(k, []).append((path, [int(o) for o in offsets]))
            self._dcp_index[network] = index
        return self._dcp_index[network]

    def _zero3(self, network: str, key: str, stored: str = "fp32.{g}") -> Tensor:
        """Join the ranks' pieces of ``key`` from their flat partitions (``stored``: which flat)."""
        m = self.map(network)
        entry = m["tensors"][key]
        if "group" not in entry:  # a buffer, saved whole
            with safe_open(str(self.folder / network / "buffers.safetensors"), "pt") as f:
                return f.get_tensor(key)
        numel = 1
        for s in entry["shape"]:
            numel *= s
        name, part, offset = stored.format(g=entry["group"]), entry["partition"], entry["offset"]
        pieces = []
        for rank in range(m["world_size"]):
            take = min(part, numel - rank * part)
            if take <= 0:
                break
            with safe_open(str(self.folder / network / f"rank{rank:05d}.safetensors"), "pt") as f:
                pieces.append(f.get_slice(name)[offset:offset + take])
        return torch.cat(pieces).view(entry["shape"])


def _dtype_key(safetensors_dtype: str) -> str:
    """safetensors' dtype names (F32, BF16, ...) as torch's."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
             "I32": "int32", "U8": "uint8", "BOOL": "bool"}
    return names.get(safetensors_dtype, safetensors_dtype)
