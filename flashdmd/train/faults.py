"""Test-only fault injection for the fault matrix: the one place that reads it.

The environment variable ``FLASHDMD_FAULTS`` holds comma-separated faults of the form
``kind@step[:key=value...]``; unset (every production run) means no hook is installed and the
trainer pays nothing. ``step`` is the 1-based training step whose iteration the fault hits (the
number checkpoints and metrics carry). Each fault fires at most once per process, so a rollback
that replays a step does not replay its fault. Keys:

- ``rank=R``: only on that rank (default: every rank);
- ``net=NAME``: the network whose forward output or gradients are poisoned (default ``generator``);
- ``ms=N``: for ``delay``, milliseconds slept.

Kinds:

- ``nan_loss`` / ``inf_loss``: a forward hook multiplies NAME's output by NaN / adds Inf, so every
  loss built from it (and its gradients) is non-finite;
- ``nan_grad`` / ``inf_grad``: tensor hooks poison the gradients of NAME's parameters only;
- ``kill_step``: SIGKILL to this process inside NAME's forward (mid-step);
- ``kill_save``: SIGKILL inside ``save_checkpoint``, after the engine files and before this
  rank's state and the marker (mid-save);
- ``delay``: sleep ``ms`` before the iteration (``@0`` = every step; to widen test windows).

Forward and tensor hooks are public torch API: nothing inside the algorithm or engine is patched.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ENV = "FLASHDMD_FAULTS"
KINDS = ("nan_loss", "inf_loss", "nan_grad", "inf_grad", "kill_step", "kill_save", "delay")


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None = None
    net: str = "generator"
    ms: int = 0
    fired: bool = field(default=False, compare=False)

    def applies(self, step: int, rank: int) -> bool:
        if self.rank is not None and self.rank != rank:
            return False
        if self.kind == "delay":
            return self.step in (0, step)
        return not self.fired and self.step == step


def parse_faults(text: str) -> list[Fault]:
    """``kind@step[:key=value...]`` items, comma-separated; raises ValueError naming a bad item."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, *options = item.split(":")
        kind, _, step = head.partition("@")
        if kind not in KINDS or not step.isdigit():
            raise ValueError(f"{ENV}: bad fault {item!r}; expected kind@step with kind in {KINDS}")
        fault = Fault(kind, int(step))
        for option in options:
            key, _, value = option.partition("=")
            if key == "rank":
                fault.rank = int(value)
            elif key == "net":
                fault.net = value
            elif key == "ms":
                fault.ms = int(value)
            else:
                raise ValueError(f"{ENV}: unknown option {key!r} in {item!r} (rank, net, ms)")
        faults.append(fault)
    return faults


def _poison_output(kind: str) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return output * float("nan") if kind == "nan_loss" else output + float("inf")
        return output
    return hook


def _kill_hook(module: nn.Module, args: Any, output: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    """Installs the configured faults around one training iteration on one rank."""

    def __init__(self, faults: list[Fault], modules: dict[str, nn.Module], rank: int) -> None:
        self.faults, self.modules, self.rank = faults, modules, rank
        self._handles: list[Any] = []
        self._step = 0

    @classmethod
    def from_env(cls, modules: dict[str, nn.Module], rank: int) -> Faults:
        return cls(parse_faults(os.environ.get(ENV, "")), modules, rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def begin(self, step: int) -> None:
        """Before the iteration that produces ``step``: arm this step's faults."""
        self._step = step
        for fault in self.faults:
            if not fault.applies(step, self.rank) or fault.kind == "kill_save":
                continue
            fault.fired = True
            if fault.kind == "delay":
                time.sleep(fault.ms / 1000)
                continue
            module = self.modules[fault.net]
            if fault.kind in ("nan_loss", "inf_loss"):
                self._handles.append(module.register_forward_hook(_poison_output(fault.kind)))
            elif fault.kind == "kill_step":
                self._handles.append(module.register_forward_hook(_kill_hook))
            else:
                value = float("nan") if fault.kind == "nan_grad" else float("inf")
                self._handles += [p.register_hook(lambda g, v=value: g * v)
                                  for p in module.parameters() if p.requires_grad]

    def end(self) -> None:
        """After the iteration: remove its hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mid_save(self, step: int) -> None:
        """Called by the checkpoint writer between the engine files and the marker."""
        for fault in self.faults:
            if fault.kind == "kill_save" and fault.applies(step, self.rank):
                os.kill(os.getpid(), signal.SIGKILL)


_ACTIVE: Faults | None = None


def activate(faults: Faults) -> None:
    """Make ``faults`` the ones ``mid_save`` consults (set by the trainer when any are configured)."""
    global _ACTIVE
    _ACTIVE = faults if faults else None


def mid_save(step: int) -> None:
    """Hook point inside ``save_checkpoint``; a no-op unless test faults are active."""
    if _ACTIVE is not None:
        _ACTIVE.mid_save(step)
