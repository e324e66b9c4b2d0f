"""Reading a released PyTorch checkpoint without running its pickle: the converters' one loader.

``load_state_dict(path)`` is ``torch.load(weights_only=True)``: tensors, containers and numbers
only. A file that needs anything else (a pickled ``nn.Module``, a training-code class) is refused
with ``UnsafeCheckpoint``, whose message lists the Python objects the pickle would import and call,
found by reading its opcodes (``pickletools``) without executing any of them.

``load_inert(path)`` reads a release that *is* a whole pickled model (``torch.save(model)``) without
importing or running its classes: every global the pickle names becomes an inert stand-in that only
records its pickled state, except the few torch tensor rebuild functions (reimplemented here),
``collections.OrderedDict``, ``set`` and torch dtypes. A pickle that calls anything else is refused,
naming the global. ``module_tensors`` walks the stand-ins' ``_parameters``/``_buffers``/``_modules``
into a flat state dict.
"""

from __future__ import annotations

import pickle
import sys
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import torch

# what torch's weights-only unpickler itself allows: left out of the refusal message
PLAIN = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.Size",
    "builtins.set",
    "__builtin__.set",
    "torch.device",
    "_codecs.encode",
}


class UnsafeCheckpoint(RuntimeError):
    """The checkpoint is not plain data; the message names what loading it would execute."""


def pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every global the checkpoint's pickle references, in order, without loading it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
    else:
        data = path.read_bytes()
    found: list[str] = []
    strings: list[str] = []  # STACK_GLOBAL takes module and name from the two strings pushed before it
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif opcode.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif opcode.name == "STOP":
            break
    return list(dict.fromkeys(found))


def load_state_dict(path: str | Path) -> dict:
    """The checkpoint's plain data (``torch.load(weights_only=True)``), or ``UnsafeCheckpoint``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        foreign = [g for g in pickle_globals(path) if g not in PLAIN and not g.endswith("Storage")]
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it is not a plain state dict, and loading it would import and run "
            f"{', '.join(foreign) or 'objects torch does not allow'}; export its state_dict() as tensors first "
            "(in an environment you trust), then convert that file"
        ) from None


class Inert:
    """Stand-in for a class or function a pickle names: it keeps what the pickle gives it and runs nothing."""

    global_name = ""

    def __new__(cls, *args: Any) -> Self:  # NEWOBJ: the class's own __new__/__init__ never run
        obj = object.__new__(cls)
        obj.__dict__.update(state={}, items={}, args=args)
        return obj

    def __setstate__(self, state: Any) -> None:  # BUILD: (dict, slots) when the class has __slots__
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["state"] = state if isinstance(state, dict) else {"": state}

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS of a dict subclass
        self.items[key] = value


class _Refused(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _InertType(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # REDUCE / INST / OBJ: the pickle would run it
        raise _Refused(cls.global_name)


class _StorageDtype:
    """What a ``torch.<Type>Storage`` global stands for in a persistent id: the element type."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}  # fmt: skip
_TENSOR_TYPE = object()  # ``torch.Tensor`` as the target type of ``_rebuild_from_type_v2``


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, _state: Any) -> torch.Tensor:
    # the state is the tensor's ``__dict__`` (e.g. a buffer's ``persistent`` flag): not needed for its values
    if new_type is not _TENSOR_TYPE or func is not _rebuild_tensor:
        raise _Refused("torch._tensor._rebuild_from_type_v2 of something other than a plain tensor")
    return func(*args)


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TENSOR_TYPE,
}  # fmt: skip


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(f"{root}data.pkl"))
        self.archive, self.root = archive, root
        self.stand_ins: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:  # never imports ``module``
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageDtype(STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # a value (e.g. a config's torch_dtype), not a callable
        full = f"{module}.{name}"
        if full not in self.stand_ins:
            self.stand_ins[full] = _InertType(name, (Inert,), {"global_name": full})
        return self.stand_ins[full]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {str(pid)[:80]}")
        _, kind, key, _location, _numel = pid
        if not isinstance(kind, _StorageDtype):
            raise _Refused(f"storage type {getattr(kind, 'global_name', kind)}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.root}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


def load_inert(path: str | Path) -> Any:
    """The object a ``torch.save`` zip file holds, with every class it names replaced by an ``Inert``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint(f"{path} is not a torch.save zip archive (the legacy format is not supported)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is None:
            raise UnsafeCheckpoint(f"{path} has no data.pkl: not a torch.save archive")
        root = pkl[: -len("data.pkl")]
        if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() != b"little":
            raise UnsafeCheckpoint(f"{path} was saved big-endian; only little-endian checkpoints are supported")
        try:
            return _InertUnpickler(archive, root).load()
        except _Refused as refused:
            raise UnsafeCheckpoint(
                f"refusing to load {path}: its pickle calls {refused.name}, which is not a torch tensor rebuild "
                "(nothing was run)"
            ) from None


def module_tensors(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a stand-in ``nn.Module``: its parameters and persistent buffers, recursively."""
    state = module.state if isinstance(module, Inert) else None
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        raise UnsafeCheckpoint(f"{prefix or 'the checkpoint'} is not a pickled torch module")
    transient = state.get("_non_persistent_buffers_set") or set()
    out = {f"{prefix}{k}": v for k, v in state["_parameters"].items() if v is not None}
    out |= {f"{prefix}{k}": v for k, v in state.get("_buffers", {}).items() if v is not None and k not in transient}
    for name, child in state["_modules"].items():
        if child is not None:
            out |= module_tensors(child, f"{prefix}{name}.")
    return out


def run_converter(tool: str, eval_key: str, convert: Callable[[], Path]) -> int:
    """The converters' command-line ending: run ``convert``; a refused or unfit release is one
    line on stderr and exit code 1, a written folder says which ``eval.weights`` key takes it."""
    try:
        out = convert()
    except (UnsafeCheckpoint, KeyError, FileNotFoundError) as err:
        print(f"{tool}: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: set eval.weights.{eval_key}={out}")
    return 0
