"""Safe on-disk state for engines: tensors in safetensors, everything else in JSON.

Checkpoints are read back on resume, possibly from a shared file system other users write to,
so nothing here ever unpickles (DESIGN.md: safetensors + JSON only). Optimizer state dicts
(``{"state": {key: {name: value}}, "param_groups": [...]}``) are split into a flat tensor
dict and a JSON document and joined again on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` (any device, any layout) to a safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing (incomplete or foreign checkpoint directory?)")
    return load_file(str(path))


def save_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing (incomplete or foreign checkpoint directory?)")
    return json.loads(path.read_text())


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch optimizer state dict -> (tensors named ``state.<key>.<name>``, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for key, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{key}.{name}"] = value
            else:
                scalars.setdefault(str(key), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "keys": [str(k) for k in state_dict["state"]]}


def join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any], int_keys: bool) -> dict[str, Any]:
    """Inverse of ``split_optimizer_state``; ``int_keys`` for plain torch optimizers (keys are indices)."""
    state: dict[Any, dict[str, Any]] = {}
    for key in meta["keys"]:
        prefix = f"state.{key}."
        entry = {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}
        entry.update(meta["scalars"].get(key, {}))
        state[int(key) if int_keys else key] = entry
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def to_cpu_copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def rng_state() -> dict[str, Tensor]:
    """This process's torch RNG states (CPU, and CUDA when present) as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
