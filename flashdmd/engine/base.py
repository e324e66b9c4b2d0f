"""The engine interface: everything the algorithm and the run layer ask of an engine (DESIGN.md,
"engines" layer).

The algorithm sees networks by role name ("generator", "fake_score", "discriminator" trainable;
"teacher", "decoder", "reward", "reference", ... frozen) and asks the engine to run backward,
step, EMA and reduce metrics; the run layer asks for checkpoints, full weights, the memory
report and the learning-rate schedules (the guard lowers them after a rollback). Local, DDP,
FSDP2 and DeepSpeed ZeRO-3 implement it; the algorithm never knows which one it runs under.

Non-finite policy, the same on every engine: ``step`` refuses an update when any loss passed to
``backward`` since the last step, or the gradient norm, is NaN/Inf on ANY rank (one all-reduced
flag, so all ranks refuse the same update). A refused update leaves weights, optimizer moments
and the schedule's step counter as they were, drops the gradients, and is reported as
``{"skipped": 1.0}`` next to ``grad_norm`` and ``lr``; ``flashdmd.train.guard`` counts it.

Generator EMA (spec 6 #20 [INF]): ``track_ema(name, decay)`` keeps an fp32 shadow of a trainable
network (flashdmd.engine.shadow), which each engine's ``step`` moves after every update it
applies (``_applied``) and never after a refused one. ``save_shadows``/``load_shadows`` put it in
a step directory as one more network ``<name>_ema``.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from flashdmd.engine.common import finite_everywhere
from flashdmd.engine.lr import OptimSpec, StepSchedule
from flashdmd.engine.shadow import Shadow


class Engine(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # the dtype trainable networks run forward in under this engine's precision policy;
    # None: their own parameter dtype (local and DDP engines run the modules as built)
    compute_dtype: torch.dtype | None = None
    # one per trainable network: the learning rate written before each optimizer step
    schedules: dict[str, StepSchedule]
    # per trainable network, the losses passed to ``backward`` since its last step (finite check)
    losses: dict[str, list[Tensor]]

    # -- membership -----------------------------------------------------------------------------
    @abstractmethod
    def setup(self, trainable: dict[str, nn.Module], optim: dict[str, OptimSpec], frozen: dict[str, nn.Module]) -> None:
        """Wrap the networks: trainable ones get an optimizer and scheduler, frozen ones none."""

    @abstractmethod
    def __getitem__(self, name: str) -> nn.Module:
        """The (possibly wrapped) module to call forward on; KeyError for an unknown name."""

    @abstractmethod
    def raw(self, name: str) -> nn.Module:
        """The network ``name`` itself, inside any wrapper, as the engine holds it: a sharded
        engine may have rebuilt a meta-device network (flashdmd.nets.lazy), so a forward hook
        that must fire (the DMD2 classifier's bottleneck tap) goes on this module, not on the
        one handed to ``setup``. KeyError for an unknown name."""

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    def trainable_names(self) -> list[str]:
        """The networks that have an optimizer, sorted."""
        return sorted(self.schedules)

    # -- optimisation -------------------------------------------------------------------------
    @abstractmethod
    def backward(self, name: str, loss: Tensor) -> None:
        """Back-propagate ``loss`` for the trainable network ``name`` (recorded for the finite check)."""

    @abstractmethod
    def step(self, name: str) -> dict[str, float]:
        """Clip, optimizer step, scheduler step, zero grad; returns {"grad_norm", "lr"}, plus
        {"skipped": 1.0} when the non-finite policy (module docstring) refused the update."""

    @abstractmethod
    def zero_grad(self, name: str) -> None:
        """Drop the gradients (and recorded losses) of ``name`` without an update."""

    @abstractmethod
    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        """Inside: the named trainable networks pass gradients through but collect none
        (the generator's GAN loss through the discriminator, DeepSpeed issue #4923)."""

    @abstractmethod
    def ema_(self, target: str, source: str, decay: float) -> None:
        """target <- decay * target + (1 - decay) * source, shard by shard (spec 1.7, Eq. 11),
        through ``flashdmd.engine.common.ema_update_``."""

    @abstractmethod
    def all_reduce_mean(self, value: Tensor) -> Tensor: ...

    def scale_learning_rates(self, factor: float) -> None:
        """Multiply the base rate of every trainable network's schedule (warm-up and decay follow)."""
        for schedule in self.schedules.values():
            schedule.spec.lr *= factor

    # -- the generator EMA for evaluation and export (spec 6 #20) ---------------------------------
    @property
    def shadows(self) -> dict[str, Shadow]:
        """The EMA shadows kept, by the network they follow."""
        return self.__dict__.setdefault("_shadows", {})

    def track_ema(self, name: str, decay: float) -> None:
        """Keep an fp32 EMA of trainable network ``name``, starting at its current weights; every
        applied update of ``name`` moves it (psi <- decay psi + (1 - decay) theta, spec 1.7 Eq. 11)."""
        if name not in self.trainable_names():
            raise KeyError(f"track_ema: {name!r} is not a trainable network (trainable: {self.trainable_names()})")
        self.shadows[name] = self._shadow(name, decay)

    def _shadow(self, name: str, decay: float) -> Shadow:
        """The shadow of ``name`` in this engine's layout (flashdmd.engine.shadow)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no EMA shadow")

    def _applied(self, name: str) -> None:
        """Called by ``step`` after an update of ``name`` was applied: moves its EMA, if kept."""
        shadow = self.shadows.get(name)
        if shadow is not None:
            shadow.update_()

    def save_shadows(self, step_dir: Path) -> None:
        """Collective: every EMA shadow into ``step_dir`` as network ``<name>_ema``."""
        for name in sorted(self.shadows):
            self.shadows[name].save(Path(step_dir))

    def load_shadows(self, folder: Path) -> None:
        """Collective: restore every EMA shadow from a step directory (written at any world size,
        by any engine) or a hand-over folder (stage 2 continues stage 1's EMA)."""
        for name in sorted(self.shadows):
            self.shadows[name].load(Path(folder))

    def ema_full_state_dict(self, name: str) -> dict[str, Tensor]:
        """Collective: the full EMA tensors of network ``name`` on rank 0, {} elsewhere."""
        return self.shadows[name].full_state_dict()

    # -- the non-finite policy, shared by every engine ------------------------------------------
    def _record_loss(self, name: str, loss: Tensor) -> None:
        self.losses.setdefault(name, []).append(loss.detach())

    def _refuse_update(self, name: str, *norms: Tensor) -> bool:
        """Collective: True when a recorded loss of ``name`` or a norm is non-finite on any rank
        (one flag per rank is reduced, so ranks may have recorded different numbers of losses)."""
        return not finite_everywhere(torch.zeros(()), *self.losses.pop(name, []), *norms)

    def _skipped(self, name: str, grad_norm: float) -> dict[str, float]:
        return {"grad_norm": grad_norm, "lr": self.schedules[name].lr, "skipped": 1.0}

    # -- state and reports --------------------------------------------------------------------
    @abstractmethod
    def save(self, step_dir: Path) -> None:
        """Collective: every trainable network, optimizer and scheduler into ``step_dir``."""

    @abstractmethod
    def load(self, step_dir: Path) -> None:
        """Collective: restore what ``save`` wrote."""

    @abstractmethod
    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        """Collective: full (unsharded) weights of ``name`` on rank 0, {} elsewhere."""

    @abstractmethod
    def memory_report(self) -> dict[str, dict[str, int]]:
        """Per trainable network, this rank's bytes of parameters, gradients and optimizer state."""
