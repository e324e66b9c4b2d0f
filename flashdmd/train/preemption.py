"""Preemption and time limits: a signal sets a flag, ranks agree at a step boundary, all save, then requeue.

Slurm sends USR1 ``launch.signal_lead_s`` before the time limit (``--signal=USR1@N``) or when a
job is preempted; USR2 is submitit's default preemption signal and means the same. TERM means
the job is being stopped by someone else (``scancel``, a preemption with PreemptMode=REQUEUE
after its grace time): save, but leave the requeue decision to whoever sent it. INT (Ctrl-C on a
local run) means the same as TERM; a second Ctrl-C before the step ends stops at once
(``KeyboardInterrupt``), without saving.

The handler only records the signal. Nothing is saved inside it, because a sharded (ZeRO-3 /
FSDP) checkpoint is a collective that every rank must enter at the same point; this is where
the design departs from submitit's own ``checkpoint()`` hook, which runs on rank 0 alone inside
the signal handler (submitit #9). Instead ``should_stop(step)`` all-reduces the flag with MAX
at each step boundary, so every rank stops at the same step even when the signal reached only
some of them, and the training loop saves one checkpoint with all ranks before calling
``stop()``. ``stop()`` requeues the same job (``scontrol requeue``; for submitit's local
executor, its requeue exit code) up to ``launch.max_requeues`` times; the requeued job resumes
from the newest valid checkpoint, which it finds at start-up (never from a path baked into a
pickle). A job that fails with an error never comes through here and is not requeued.

Usage in a training loop::

    guard = Preemption(cfg, ctx)          # installs the handlers
    for step in range(start, total):
        if guard.should_stop(step):
            save_checkpoint(step)         # collective, all ranks
            guard.stop(step)              # requeues and exits; never returns
        ...
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from flashdmd.config import Config
from flashdmd.infra.distributed import DistContext, barrier

log = logging.getLogger(__name__)

# agreed reasons, ordered so that MAX picks the one that keeps the run going
NONE, TERMINATE, REQUEUE = 0, 1, 2
_REASON_OF_SIGNAL = {signal.SIGUSR1: REQUEUE, signal.SIGUSR2: REQUEUE, signal.SIGTERM: TERMINATE,
                     signal.SIGINT: TERMINATE}
REQUEUE_EXIT_CODE = 0  # the requeue is already issued; the step's exit status does not decide anything
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE: the local controller restarts the tasks


class PreemptedError(RuntimeError):
    """The run stopped on a signal after saving, and will not be requeued; resubmitting resumes it."""


class Preemption:
    """Signal flag + rank agreement + requeue for one process of a run."""

    def __init__(self, cfg: Config, ctx: DistContext, install: bool = True) -> None:
        self.max_requeues = cfg.launch.max_requeues
        self.ctx = ctx
        self.reason = NONE  # local: set by the handler
        self.agreed = NONE  # after should_stop: the same on every rank
        self.signal_time: float | None = None
        self.signal_name = ""
        self._previous: dict[signal.Signals, Any] = {}
        if install:
            self.install()

    # -- signals --------------------------------------------------------------------------------

    def install(self) -> None:
        for sig in _REASON_OF_SIGNAL:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers found at ``install`` (the process may go on)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # only record: the loop acts at the next step boundary
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the save
        if signum == signal.SIGINT and self.ctx.is_main:
            print("\nCtrl-C: saving at the end of this step, then stopping (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)
        reason = _REASON_OF_SIGNAL.get(signal.Signals(signum), TERMINATE)
        if reason > self.reason:
            self.reason = reason
            self.signal_name = signal.Signals(signum).name
            self.signal_time = time.time()

    def _reinstall_if_replaced(self) -> None:
        # a library (NCCL, a data loader) may install its own handler after us; take the signals back
        if any(signal.getsignal(sig) != self._handle for sig in _REASON_OF_SIGNAL):
            log.warning("a signal handler for USR1/USR2/TERM was replaced after start-up; reinstalling flashdmd's")
            self.install()

    # -- agreement --------------------------------------------------------------------------------

    def should_stop(self, step: int) -> bool:
        """At a step boundary: True on every rank when any rank got a stop signal (all-reduce MAX)."""
        self._reinstall_if_replaced()
        flag = torch.tensor([self.reason], dtype=torch.int32, device=self.ctx.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.agreed = int(flag.item())
        if self.agreed and self.ctx.is_main:
            what = self.signal_name or "a signal on another rank"
            log.warning("stopping at step %d: %s received; saving a checkpoint on all ranks", step, what)
        return self.agreed != NONE

    # -- after the collective save --------------------------------------------------------------

    @property
    def exit_code(self) -> int:
        """The shell's status for "ended by" the signal received (TERM when it reached another rank)."""
        return 128 + (signal.Signals[self.signal_name] if self.signal_name else signal.SIGTERM)

    def requeues_left(self) -> int:
        return self.max_requeues - self._restart_count()

    def stop(self, step: int) -> None:
        """Requeue (when the signal asked for it and requeues are left) and exit; never returns.

        Call after every rank has saved the checkpoint of ``step``. Raises ``SystemExit`` when the
        job is requeued or was told to stop by SIGTERM (so submitit writes no result and a
        requeued run supplies it), and ``PreemptedError`` when USR1 asked for a requeue but none
        is left, so the job ends visibly failed with the reason.
        """
        barrier()  # every rank has finished writing before anyone requeues
        if self.agreed == TERMINATE:
            # scancel, `scontrol requeue` or PreemptMode=REQUEUE: whoever sent TERM decides what
            # happens next; leave without a result, so a requeued run can still supply it
            if self.ctx.is_main:
                log.warning("step %d saved after %s; exiting (rerun the same command to resume)", step,
                            self.signal_name or "a signal on another rank")
            raise SystemExit(self.exit_code)
        if self.requeues_left() > 0:
            raise SystemExit(self._requeue(step))
        raise PreemptedError(
            f"stopped after saving step {step}; not requeued because it was already requeued "
            f"{self._restart_count()} times (launch.max_requeues={self.max_requeues}). "
            "Resubmit the same command to resume."
        )

    def _restart_count(self) -> int:
        if self.ctx.launcher == "submitit-local":
            return _local_restart_count()
        return self.ctx.restart_count

    def _requeue(self, step: int) -> int:
        if self.ctx.launcher == "submitit-local":
            if self.ctx.is_main:
                _bump_local_restart_count()
                log.warning("step %d saved; asking submitit's local executor to restart the tasks", step)
            return LOCAL_REQUEUE_EXIT_CODE
        if self.ctx.launcher != "slurm":
            raise PreemptedError(
                f"stopped after saving step {step}; launcher '{self.ctx.launcher}' cannot requeue. "
                "Rerun the same command to resume."
            )
        if self.ctx.is_main:
            cmd = ["scontrol", "requeue", self.ctx.job_id]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except FileNotFoundError:
                raise PreemptedError(
                    f"step {step} saved, but scontrol is not available on this node to requeue job "
                    f"{self.ctx.job_id}; resubmit the same command to resume"
                ) from None
            if out.returncode != 0:
                raise PreemptedError(f"step {step} saved, but '{' '.join(cmd)}' failed: {out.stderr.strip()}")
            left = self.requeues_left() - 1
            log.warning("step %d saved; requeued Slurm job %s (%d requeues left)", step, self.ctx.job_id, left)
        sys.stdout.flush()
        return REQUEUE_EXIT_CODE


def _local_counter() -> Path | None:
    folder = os.environ.get("SUBMITIT_FOLDER")
    job = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    return Path(folder) / f"{job}_requeues" if folder and job else None


def _local_restart_count() -> int:
    path = _local_counter()
    return int(path.read_text()) if path and path.is_file() else 0


def _bump_local_restart_count() -> None:
    path = _local_counter()
    if path:
        path.write_text(str(_local_restart_count() + 1))
