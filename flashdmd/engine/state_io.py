"""Safe on-disk state for engines: tensors in safetensors, everything else in JSON.

Checkpoints are read back on resume, possibly from a shared file system other users write to,
so nothing here ever unpickles (DESIGN.md: safetensors + JSON only). Optimizer state dicts
(``{"state": {key: {name: value}}, "param_groups": [...]}``) are split into a flat tensor
dict and a JSON document and joined again on load.

Every file goes through ``atomic_write``: a unique temporary file in the same folder, renamed
over the target, so a reader (or a crash) never sees half a file, and given the permissions a
plain ``open`` would (0666 less the umask; ``mkstemp`` alone makes 0600, which hides the weights
from the group that shares a run directory).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced, given the umask's
    permissions and renamed to ``path``; on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` the umask's permissions (safetensors' own ``save_file``, and
    through it diffusers' ``save_pretrained``, leaves 0600 files behind)."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any device, any layout) to a safetensors file, atomically."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata)


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing (incomplete or foreign checkpoint directory?)")
    return load_file(str(path))


def save_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


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
