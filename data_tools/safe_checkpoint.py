"""Reading a released PyTorch checkpoint without running its pickle: the converters' one loader.

``load_state_dict(path)`` is ``torch.load(weights_only=True)``: tensors, containers and numbers
only. A file that needs anything else (a pickled ``nn.Module``, a training-code class) is refused
with ``UnsafeCheckpoint``, whose message lists the Python objects the pickle would import and call,
found by reading its opcodes (``pickletools``) without executing any of them.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from pathlib import Path

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
