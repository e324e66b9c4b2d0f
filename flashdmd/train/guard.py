"""Non-finite steps: count, skip together, roll back or stop (config ``health``).

Every engine (local/DDP, FSDP2, DeepSpeed ZeRO-3) refuses an optimizer update when its loss or
gradient norm is NaN or Inf on any rank (one all-reduced flag, so every rank refuses the same
one; the policy is declared once in flashdmd/engine/base.py) and reports it as ``<net>_skipped``:
a run takes the same path whatever engine it runs under. After each iteration the trainer hands
the metrics to ``StepGuard.check``, which decides for the whole job: a step is bad when any rank saw a non-finite loss, gradient
norm or a skipped update (one all-reduce of a flag, so ranks can never disagree). Bad steps are
counted; after ``health.max_consecutive_nonfinite`` in a row the guard answers ``rollback``
(restore the newest valid checkpoint, every learning rate times ``health.rollback_lr_factor``)
or, with ``health.on_nonfinite=stop``, with no checkpoint, or past ``health.max_rollbacks``,
raises ``TrainingHealthError`` naming the steps and the offending values.

The learning-rate scale and the counts go into trainer.json (``state_dict``), so a run resumed
after a rollback keeps its lowered rates.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from flashdmd.config import HealthConfig
from flashdmd.engine.base import Engine

log = logging.getLogger("flashdmd.guard")

OK, SKIPPED, ROLLBACK = "ok", "skipped", "rollback"


class TrainingHealthError(RuntimeError):
    """Training cannot go on: too many non-finite steps; the message says which and what to change."""


def non_finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that show a bad step: skipped updates and non-finite losses (or other values).

    A gradient norm alone is not judged: every engine reports a non-finite one together with
    ``<net>_skipped``, and DeepSpeed's is NaN when a non-finite loss skipped its step unmeasured."""
    return {k: v for k, v in metrics.items()
            if (k.endswith("skipped") and v > 0) or (not math.isfinite(v) and not k.endswith("grad_norm"))}


def _any_rank(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class StepGuard:
    def __init__(self, cfg: HealthConfig, engine: Engine) -> None:
        self.cfg, self.engine = cfg, engine
        self.skipped = 0  # bad steps in the whole run
        self.consecutive = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._first_bad = 0
        self._last_bad: dict[str, float] = {}

    def check(self, step: int, metrics: dict[str, float]) -> str:
        """Collective: OK, SKIPPED or ROLLBACK for the step just run; raises TrainingHealthError to stop."""
        bad = non_finite(metrics)
        if not _any_rank(bool(bad), self.engine.device):
            self.consecutive = 0
            return OK
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self._first_bad = step
        self._last_bad = bad or self._last_bad
        log.warning("step %d: non-finite loss or gradient on some rank (%s); update skipped (%d in a row, %d in all)",
                    step, _show(bad) or "on another rank", self.consecutive, self.skipped)
        if self.consecutive < self.cfg.max_consecutive_nonfinite:
            return SKIPPED
        if self.cfg.on_nonfinite == "stop" or self.rollbacks >= self.cfg.max_rollbacks:
            why = ("health.on_nonfinite=stop" if self.cfg.on_nonfinite == "stop"
                   else f"already rolled back {self.rollbacks} time(s) (health.max_rollbacks={self.cfg.max_rollbacks})")
            raise self._stop(step, why)
        return ROLLBACK

    def rolled_back(self, to_step: int) -> None:
        """The trainer restored ``to_step``: lower every learning rate and start counting afresh."""
        self.rollbacks += 1
        self.consecutive = 0
        self.lr_scale *= self.cfg.rollback_lr_factor
        self.engine.scale_learning_rates(self.cfg.rollback_lr_factor)
        log.warning("rolled back to step %d; learning rates x%g (now x%g of the configured ones), rollback %d of %d",
                    to_step, self.cfg.rollback_lr_factor, self.lr_scale, self.rollbacks, self.cfg.max_rollbacks)

    def no_checkpoint(self, step: int) -> TrainingHealthError:
        return self._stop(step, "there is no valid checkpoint to roll back to")

    def _stop(self, step: int, why: str) -> TrainingHealthError:
        return TrainingHealthError(
            f"{self.consecutive} consecutive steps ({self._first_bad}..{step}) had a non-finite loss or gradient "
            f"(last: {_show(self._last_bad) or 'on another rank'}); stopping because {why}. Lower the learning rates "
            f"(stage1.*_lr) or stage1.grad_clip, check the data, or change health.on_nonfinite / "
            f"health.max_rollbacks."
        )

    def metrics(self) -> dict[str, float]:
        return {"health/skipped_steps": float(self.skipped), "health/rollbacks": float(self.rollbacks),
                "health/lr_scale": self.lr_scale}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts, and re-apply the lowered learning rates to the fresh engine of a resumed run."""
        self.skipped, self.rollbacks = int(state.get("skipped", 0)), int(state.get("rollbacks", 0))
        scale = float(state.get("lr_scale", 1.0))
        if scale != 1.0:
            self.engine.scale_learning_rates(scale / self.lr_scale)
        self.lr_scale = scale


def _show(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(values.items())[:6])
