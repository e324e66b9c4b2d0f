"""One progress line per log step on rank 0: step, every loss, samples/s and the time left.

    step 40/800 (5%)  loss/dmd 0.0213  loss/gan_g 0.702  loss/fake 0.0514  loss/d 1.38  |  9120 samples/s  ETA 2m41s

The line goes through the ``flashdmd.progress`` logger (INFO), so it reaches the terminal of a
local run, the job log under Slurm and the log that jobs/submit.py follows for local jobs
(``flashdmd.infra.logs``). The ETA is the mean step time since this process started (resume
included) times the steps left: the first windows include start-up costs and settle after.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("flashdmd.progress")


def duration(seconds: float) -> str:
    """``3h02m``, ``2m41s`` or ``12s``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(self, total: int, start_step: int, enabled: bool = True) -> None:
        self.total, self.start_step, self.enabled = total, start_step, enabled
        self.started = time.perf_counter()

    def line(self, step: int, logged: dict[str, float]) -> str:
        losses = "  ".join(f"{k} {v:.4g}" for k, v in logged.items() if k.startswith("loss/"))
        done = step - self.start_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        rate = logged.get("perf/samples_per_s")
        tail = [f"{rate:.4g} samples/s"] if rate is not None else []
        tail.append(f"ETA {duration(per_step * (self.total - step))}")
        pct = 100.0 * step / max(self.total, 1)
        return f"step {step}/{self.total} ({pct:.0f}%)  {losses}  |  {'  '.join(tail)}"

    def __call__(self, step: int, logged: dict[str, float]) -> None:
        if self.enabled:
            log.info("%s", self.line(step, logged))
