"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay (spec 1.6 [INF]).

A plain step counter that writes ``lr`` into an optimizer's ``param_groups`` before each step,
so the same object drives a torch optimizer, an FSDP2 optimizer and a DeepSpeed ZeRO optimizer
(whose wrapper is not a ``torch.optim.Optimizer`` and so cannot take a torch LR scheduler).
Its state is one integer, saved as JSON with the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimSpec:
    """AdamW with warm-up and a schedule, per trainable network (spec 1.6 [INF]: DMD2's optimiser)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    total_steps: int = 1
    grad_clip: float = 10.0


def lr_at(spec: OptimSpec, step: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if spec.schedule not in SCHEDULES:
        raise ValueError(f"OptimSpec.schedule must be one of {SCHEDULES}, got {spec.schedule!r}")
    if spec.warmup_steps > 0 and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    span = max(1, spec.total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.lr * (1.0 - progress)


class StepSchedule:
    """Counts optimizer steps and sets the learning rate of ``param_groups`` before each one."""

    def __init__(self, spec: OptimSpec) -> None:
        self.spec = spec
        self.steps_done = 0

    @property
    def lr(self) -> float:
        return lr_at(self.spec, self.steps_done)

    def apply(self, param_groups: list[dict[str, Any]]) -> float:
        """Write the current rate into every group; returns it."""
        lr = self.lr
        for group in param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, int]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps_done = int(state["steps_done"])
