"""A test-only training entry with the contract of flashdmd.train.main.main(cfg, job), minus the model.

It exercises exactly the launch-layer plumbing: distribution from the launcher's environment
(flashdmd.infra.distributed), a real collective every step (checked against its closed form), the
preemption flag agreed at each step boundary (flashdmd.train.preemption), a step-directory checkpoint
written by every rank and made valid by a marker written last, resume from the newest valid one,
and a run id kept across requeues. Rank 0 appends one JSON line per event to
<run_dir>/events.jsonl, which the tests read. Knobs (tests only) ride in cfg.tracking.tags:
``step_s`` (seconds per step) and ``fail_at`` (raise a real error at that step).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flashdmd.config import Config
from flashdmd.infra.distributed import DistContext, barrier, init_distributed, shutdown
from flashdmd.train.preemption import Preemption

MARKER = "COMPLETE"


def newest_valid(ckdir: Path) -> Path | None:
    steps = sorted(ckdir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return next((p for p in reversed(steps) if (p / MARKER).is_file()), None)


def save(ckdir: Path, step: int, run_id: str, ctx: DistContext) -> None:
    folder = ckdir / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{ctx.rank}.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    barrier()
    if ctx.is_main:
        (folder / MARKER).write_text(str(ctx.world_size))  # last: only now is the step valid


def event(run_dir: Path, ctx: DistContext, kind: str, **fields: Any) -> None:
    if ctx.is_main:
        with open(run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), "restart": ctx.restart_count, **fields}) + "\n")


def main(cfg: Config, job: str) -> dict[str, Any]:
    ctx = init_distributed(cfg)
    guard = Preemption(cfg, ctx)
    run_dir, ckdir = cfg.run_dir, cfg.checkpoint_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    step_s = float(cfg.tracking.tags.get("step_s", "0.25"))
    fail_at = int(cfg.tracking.tags.get("fail_at", "-1"))
    total = cfg.stage1.iterations if job == "stage1" else cfg.stage2.iterations

    # resume: the newest valid step directory decides, never anything stored in the submission
    latest = newest_valid(ckdir)
    if latest is not None:
        state = json.loads((latest / f"rank{ctx.rank}.json").read_text())
        start, run_id = state["step"], state["run_id"]
    else:
        ids = [uuid.uuid4().hex if ctx.is_main else ""]
        dist.broadcast_object_list(ids, src=0)
        start, run_id = 0, ids[0]
    event(run_dir, ctx, "resume" if latest else "start", step=start, run_id=run_id, world=ctx.world_size,
          master=f"{ctx.master_addr}:{ctx.master_port}", launcher=ctx.launcher, pid=os.getpid())

    for step in range(start, total):
        if guard.should_stop(step):
            save(ckdir, step, run_id, ctx)
            event(run_dir, ctx, "stop", step=step, signal=guard.signal_name)
            guard.stop(step)
        if step == fail_at:
            raise RuntimeError(f"probe: deliberate failure at step {step}")
        value = torch.tensor([float(ctx.rank + 1)])
        dist.all_reduce(value)
        expected = ctx.world_size * (ctx.world_size + 1) / 2
        if value.item() != expected:
            raise AssertionError(f"all_reduce gave {value.item()}, expected {expected}")
        time.sleep(step_s)
        event(run_dir, ctx, "step", step=step)
        if (step + 1) % cfg.checkpoint.every == 0:
            save(ckdir, step + 1, run_id, ctx)
    save(ckdir, total, run_id, ctx)
    event(run_dir, ctx, "done", step=total)
    result = {"rank": ctx.rank, "world": ctx.world_size, "run_id": run_id, "restarts": ctx.restart_count,
              "launcher": ctx.launcher, "master": ctx.master_addr}
    shutdown()
    return result
