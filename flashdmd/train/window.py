"""Metrics aggregated over the logging window (DESIGN.md: every loss appears at every log step).

The algorithm reports, per iteration, only what that iteration computed: with TTUR > 1 the
generator's losses exist on every ``ttur``-th iteration only (spec 1.6), in stage 2 the RL and
distillation losses alternate (spec 2.5), and a per-timestep statistic exists only on the
iterations whose DM branch drew that timestep (spec 1.3). Logging the one iteration that lands on
the log step therefore loses whole networks. ``MetricWindow`` keeps every value since the last
log step instead and reports, per metric, the mean over the iterations where it occurred and
``steps/<name>``, how many those were. A metric seen earlier in the run but not in this window
(a window shorter than the RL:DM period, a timestep not drawn) repeats its last mean with
``steps/<name>`` = 0, so every chart has a point at every log step and the count says it is old.

Non-finite values (a skipped update's NaN loss) are left out of the mean, which would otherwise
hide every finite value of the window; the step guard counts them (``health/skipped_steps``).
When a metric had only non-finite values, its last value is reported, so the NaN stays visible.

Names: the algorithm's ``loss_<x>`` is logged as ``loss/<x>``, one chart group in MLflow; the
counts go under ``steps/``, which MLflow's run page (sections in name order) shows after the losses.
"""
from __future__ import annotations

import math
from collections import defaultdict

COUNT_PREFIX = "steps/"  # steps/<name>: the iterations of the window that reported <name>


def display_name(key: str) -> str:
    """The tracked name of an algorithm metric: ``loss_dmd`` -> ``loss/dmd``; others unchanged."""
    return "loss/" + key.removeprefix("loss_") if key.startswith("loss_") else key


class MetricWindow:
    """Sums and counts of each metric since the last ``summary()``, and the iterations' time and samples."""

    def __init__(self, with_counts: bool = True) -> None:
        self.with_counts = with_counts
        self._sum: dict[str, float] = defaultdict(float)
        self._finite: dict[str, int] = defaultdict(int)
        self._last: dict[str, float] = {}
        self._previous: dict[str, float] = {}  # each metric's last reported mean
        self.steps, self.seconds, self.samples = 0, 0.0, 0

    def add(self, metrics: dict[str, float], seconds: float = 0.0, samples: int = 0) -> None:
        """The metrics of one iteration, which took ``seconds`` for ``samples`` samples."""
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        for key, value in metrics.items():
            value = float(value)
            self._last[key] = value
            if math.isfinite(value):
                self._sum[key] += value
                self._finite[key] += 1

    def summary(self) -> dict[str, float]:
        """Mean over the iterations where each metric occurred (+ ``steps/<name>``); starts a new window."""
        out: dict[str, float] = {}
        for key in [*self._last, *(k for k in self._previous if k not in self._last)]:
            n = self._finite.get(key, 0)
            if key in self._last:
                out[key] = self._sum[key] / n if n else self._last[key]
            else:
                out[key] = self._previous[key]
            if self.with_counts:
                out[COUNT_PREFIX + key] = float(n)
        self._previous.update({k: out[k] for k in self._last})
        self.reset()
        return out

    def reset(self) -> None:
        self._sum.clear()
        self._finite.clear()
        self._last.clear()
        self.steps, self.seconds, self.samples = 0, 0.0, 0
