"""The one training entry point: stage 1 or stage 2 on any family and engine (DESIGN.md, "run").

``main(cfg, job)`` builds everything from the resolved config and runs the loop in sections:
setup (process group, networks, engine), resume (newest valid checkpoint of this run, or for a
new stage-2 run the stage-1 hand-over), loop (batch -> algorithm step -> metrics -> monitor ->
checkpoint / preemption), and finish (final checkpoint and the hand-over of full weights).

The same function runs under torchrun, srun, submitit or a plain ``python -m flashdmd.train.main``:
the launcher only sets environment variables (``flashdmd.infra.distributed``). Re-running the same
command resumes from the newest valid checkpoint in the same MLflow run; a rerun with another
config is refused unless resuming is asked for (``flashdmd.train.rundir``).

Metrics are aggregated over the logging window (``flashdmd.train.window``), so every network's
losses appear at every log step whatever the TTUR or RL:DM ratio; rank 0 prints one progress line
per log step (``flashdmd.train.progress``). A signal (Ctrl-C, TERM, Slurm's USR1) stops the loop at
the next step boundary with a checkpoint; the MLflow run is then marked KILLED (FAILED on a crash)
and its last points are sent before the process exits or requeues.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flashdmd.algo.optim import optim_specs
from flashdmd.algo.stage1 import Stage1
from flashdmd.algo.stage2 import Stage2
from flashdmd.train.checkpoint import Resumed, latest_valid, load_checkpoint, save_checkpoint
from flashdmd.config.cli import config_from_cli
from flashdmd.data.position import resplit_streams
from flashdmd.data.bad_samples import RECORD_ENV, recorded_bad_samples
from flashdmd.config import DEFAULT_PRESET, Config, ConfigError, to_yaml
from flashdmd.infra.distributed import DistContext, barrier, init_distributed, shutdown
from flashdmd.engine.base import Engine
from flashdmd.engine.factory import build_engine
from flashdmd.engine.state_io import load_json
from flashdmd.nets.parts import Parts
from flashdmd.nets.registry import build_parts
from flashdmd.train.preemption import Preemption
from flashdmd.train.batches import build_batches
from flashdmd.train.compat import check_resume, checkpoint_identity
from flashdmd.train.faults import Faults, activate
from flashdmd.train.guard import ROLLBACK, StepGuard
from flashdmd.train.handoff import Handoff, apply_handoff, read_handoff, reference_policy, write_handoff
from flashdmd.train.health import HealthMonitor
from flashdmd.train.monitor import build_monitor
from flashdmd.train.progress import Progress
from flashdmd.train.rundir import RESUME_ENV, check_run_dir
from flashdmd.train.window import MetricWindow, display_name
from flashdmd.infra.logs import setup_logging
from flashdmd.infra.tracking import COMMAND_ENV, NullTracker, discard_writer, open_tracker, start_writer

log = logging.getLogger("flashdmd.train")
BAD_SAMPLES = "bad_samples.jsonl"  # each distinct bad input item, appended by every rank's data stream
JOBS = ("stage1", "stage2")


def main(cfg: Config, job: str) -> Path:
    """Run ``job`` (stage1 | stage2) to ``iterations``; returns the hand-over folder of full weights."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if job == "stage2" and not cfg.stage2.init_from:
        raise ConfigError("stage 2 needs stage2.init_from: the stage-1 run directory (or its 'final' folder)")
    ctx = init_distributed(cfg)
    setup_logging(ctx.rank)
    split_cpu_threads(ctx)
    try:
        return Trainer(cfg, job, ctx).run()
    finally:
        shutdown()


def split_cpu_threads(ctx: DistContext) -> None:
    """On CPU, give each of the node's ranks its share of the cores for intra-op threads.

    torch's default gives every process all cores, so two ranks on two cores ran four threads
    that spin against each other: a tiny-sdxl stage-1 step took 4.0-6.5 s per rank against 0.30 s
    with one thread each. An explicit OMP_NUM_THREADS (slurm/env.sh sets it) wins, and
    a process already set to fewer threads keeps them."""
    if ctx.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, ctx.local_world_size))
    torch.set_num_threads(min(torch.get_num_threads(), share))


class Trainer:
    def __init__(self, cfg: Config, job: str, ctx: DistContext) -> None:
        self.cfg, self.job, self.ctx = cfg, job, ctx
        self.stage = 1 if job == "stage1" else 2
        # data.global_batch_size (spec 1.9) on any GPU count: this rank's share, uneven when W does not divide it
        cfg.data.batch_size = cfg.data.per_rank(ctx.world_size, ctx.rank)
        self.updates: dict[str, int] = {}  # optimizer steps per trainable network (TTUR, RL:DM made visible)
        self.iterations = cfg.stage1.iterations if self.stage == 1 else cfg.stage2.iterations

    # -- setup ----------------------------------------------------------------------------------
    def _build_parts(self) -> Parts:
        cache_dir = Path(self.cfg.model.cache_dir or Path(self.cfg.run_root) / "cache")
        # rank 0 first: tiny presets and the toy teacher are built once into the cache, then read.
        # Sharded engines get the students on the meta device in both stages; stage 2 points
        # them at the hand-over (flashdmd.train.handoff) and each rank reads only its shard.
        if self.ctx.rank == 0:
            parts = build_parts(self.cfg, cache_dir)
        barrier()
        if self.ctx.rank != 0:
            parts = build_parts(self.cfg, cache_dir)
        return parts

    def _setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.ctx.rank)
        self.parts = self._build_parts()
        text_encoder = self.parts.extras.get("text_encoder")
        if text_encoder is not None:  # frozen, outside the engine: encodes prompts where the nets run
            text_encoder.to(self.ctx.device)
        self.handoff: Handoff | None = None
        frozen = self.parts.frozen()
        self.engine: Engine = build_engine(cfg, self.ctx.device)
        if self.stage == 2:
            self.handoff = read_handoff(cfg.stage2.init_from)
            apply_handoff(self.handoff, self.parts.trainable(), cfg)
            # spec 2.4: the reference policy is the generator before RL, frozen, in the policy's dtype
            frozen["reference"] = reference_policy(self.parts.generator, self.engine.compute_dtype,
                                                   sharded=cfg.engine.teacher_sharding == "zero3")
        self.engine.setup(self.parts.trainable(), optim_specs(cfg, self.stage), frozen)
        if cfg.stage1.generator_ema:  # spec 6 #20: for evaluation and export; stage 2 continues stage 1's
            self.engine.track_ema("generator", cfg.stage1.generator_ema_decay)
            if self.handoff is not None:
                self.engine.load_shadows(self.handoff.folder)
        stage1 = Stage1(cfg.stage1, self.parts, self.engine, cfg.seed)
        self.algo = stage1 if self.stage == 1 else Stage2(cfg, self.parts, self.engine, cfg.seed, stage1)
        # non-finite steps, health monitors, and test-only faults (FLASHDMD_FAULTS)
        self.guard = StepGuard(cfg.health, self.engine)
        self.health = HealthMonitor(cfg, self.parts, self.stage, lambda s: stage1.steps[stage1.plan(s).dm_index],
                                    self.ctx.rank) if cfg.health.monitors else None
        self.faults = Faults.from_env({**self.parts.trainable(), **frozen}, self.ctx.rank)
        activate(self.faults)

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> tuple[int, str | None, dict[str, Any] | None]:
        path = latest_valid(self.cfg.checkpoint_dir)
        if path is None:
            return 0, None, None
        check_resume(load_json(path / "trainer.json"), self.cfg, self.job, path)
        changed = check_run_dir(self.cfg)
        resumed = load_checkpoint(self.engine, path)
        self.guard.load_state_dict(resumed.trainer.get("guard", {}))
        self.updates.update(resumed.trainer.get("updates", {}))
        if self.health is not None:
            self.health.load_state_dict(resumed.trainer.get("health", {}))
        if self.ctx.is_main:
            log.info("resuming run %s from step %d (%s)", self.cfg.name, resumed.step, path)
            if changed:  # asked for: the saved config becomes this one, the MLflow run lists the keys
                log.warning("resuming with %d config changes: %s", len(changed), "; ".join(changed))
                (self.cfg.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        return resumed.step, resumed.trainer.get("mlflow_run_id"), self._data_state(resumed)

    def _data_state(self, resumed: Resumed) -> dict[str, Any] | None:
        """This rank's data position; at another world size, every saved rank's re-split (data/position.py)."""
        if resumed.resharded:
            return resplit_streams([s.get("data") for s in resumed.rank_states], self.ctx.rank, self.ctx.world_size)
        return resumed.rank_state.get("data")

    def _open_tracker(self, run_id: str | None, writer: subprocess.Popen[str] | None) -> NullTracker:
        parent = self.handoff.run_id if self.handoff else None
        parent_name = self.handoff.folder.resolve().parent.name if self.handoff else None  # <run_dir>/final
        tracker = open_tracker(self.cfg, self.ctx.rank, run_id, parent, stage=self.job, parent_name=parent_name,
                               writer=writer)
        if tracker.page:
            log.info("MLflow run %s (%s): %s", self.cfg.name, tracker.run_id, tracker.page)
        if self.ctx.is_main and run_id is None:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (self.cfg.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            tracker.log_config(self.cfg)
        return tracker

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        # rank 0's MLflow writer starts first: its imports and the store's opening overlap the set-up
        writer = start_writer(cfg.tracking_uri) if self.ctx.rank == 0 else None
        # the handlers go in before the set-up: a signal during it (the toy teacher's pretraining,
        # loading a model) is recorded, not fatal, and the loop saves and stops after its first step
        preemption = Preemption(cfg, self.ctx)
        try:
            self._setup()
            step, run_id, data_state = self._resume()
            tracker = self._open_tracker(run_id, writer)
        except BaseException:
            discard_writer(writer)
            preemption.uninstall()
            raise
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RECORD_ENV] = str((self.cfg.run_dir / BAD_SAMPLES).resolve())  # every rank's loader appends
        batches = build_batches(cfg, self.parts, self.ctx.rank, self.ctx.world_size, self.ctx.device, data_state)
        monitor = build_monitor(cfg, self.parts, self.ctx.device)
        progress = Progress(self.iterations, step, enabled=self.ctx.is_main)
        window = MetricWindow()  # every iteration's metrics since the last log step
        if step == 0 and cfg.tracking.sample_every and monitor.at_start:
            monitor(self.engine, tracker, 0)
        status = "FAILED"
        try:
            while step < self.iterations:
                started = time.perf_counter()
                batch = batches.next_batch(step)
                self.faults.begin(step + 1)
                metrics = self.algo.step(step, batch)
                self.faults.end()
                if self.guard.check(step + 1, metrics) == ROLLBACK:
                    step, batches = self._rollback(step + 1)
                    window.reset()
                    continue
                if self.health is not None:
                    self.health.observe(step, metrics)
                self._count_updates(metrics)
                window.add({display_name(k): v for k, v in metrics.items()}, time.perf_counter() - started, batch.size)
                step += 1
                if step % cfg.tracking.log_every == 0 or step == self.iterations:
                    logged = self._window_metrics(window, batches.bad_counts())
                    if self.health is not None:
                        logged.update(self.health.measure(self.engine, batch, step, logged))
                    tracker.log_metrics(logged, step)
                    progress(step, logged)
                if cfg.tracking.sample_every and step % cfg.tracking.sample_every == 0:
                    monitor(self.engine, tracker, step)
                stop = preemption.should_stop(step)
                if stop or step % cfg.checkpoint.every == 0 or step == self.iterations:
                    self._save(step, tracker, batches.state_dict())
                if stop:
                    # the run's status and last points reach MLflow before a requeue ends this job
                    status = "KILLED"  # a requeued job continues this MLflow run
                    tracker.close(status)
                    preemption.stop(step)
            folder = write_handoff(self.engine, self.parts.trainable(), cfg, step, tracker.run_id)
            status = "FINISHED"
            if self.ctx.is_main:
                log.info("%s finished: run %s at step %d; full weights in %s", self.job, cfg.name, step, folder)
            return folder
        except KeyboardInterrupt:  # the second Ctrl-C: stopped without a save
            status = "KILLED"
            raise
        finally:
            tracker.close(status)
            preemption.uninstall()
            os.environ.pop(RECORD_ENV, None)

    def _window_metrics(self, window: MetricWindow, bad: dict[str, int]) -> dict[str, float]:
        """The window's means and counts, time per step, throughput, memory, data, guard and update counts;
        starts the next window."""
        steps, seconds, samples = window.steps, window.seconds, window.samples
        out = window.summary()
        out["perf/step_s"] = seconds / max(steps, 1)
        out["perf/samples_per_s"] = samples * self.ctx.world_size / max(seconds, 1e-9)
        if self.ctx.device.type == "cuda":
            out["perf/max_memory_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        else:
            out["perf/max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out.update({f"data/bad_{reason}": float(n) for reason, n in bad.items()})
        out.update(self.guard.metrics())
        out.update({f"updates/{net}": float(n) for net, n in self.updates.items()})
        return out

    def _rollback(self, at_step: int) -> tuple[int, Any]:
        """Too many non-finite steps in a row: back to the newest valid checkpoint, lower rates."""
        path = latest_valid(self.cfg.checkpoint_dir)
        if path is None:
            raise self.guard.no_checkpoint(at_step)
        resumed = load_checkpoint(self.engine, path)
        self.guard.rolled_back(resumed.step)
        batches = build_batches(self.cfg, self.parts, self.ctx.rank, self.ctx.world_size, self.ctx.device,
                                self._data_state(resumed))
        return resumed.step, batches

    def _count_updates(self, metrics: dict[str, float]) -> None:
        # the algorithm reports "<net>_lr" exactly for the networks it stepped; a skipped
        # (non-finite) update reports "<net>_skipped" = 1 and is not counted
        for net in self.parts.trainable():
            if f"{net}_lr" in metrics and not metrics.get(f"{net}_skipped", 0.0):
                self.updates[net] = self.updates.get(net, 0) + 1

    def _save(self, step: int, tracker: NullTracker, data_state: dict[str, Any]) -> None:
        health = self.health.state_dict() if self.health is not None else {}
        path = save_checkpoint(
            self.engine, self.cfg.checkpoint_dir, step,
            trainer={"mlflow_run_id": tracker.run_id, **checkpoint_identity(self.cfg, self.job),
                     "guard": self.guard.state_dict(), "health": health, "updates": self.updates},
            rank_state={"data": data_state}, keep_last=self.cfg.checkpoint.keep_last,
        )
        tracker.log_checkpoint(path, step)
        bad = recorded_bad_samples(self.cfg.run_dir / BAD_SAMPLES) if self.ctx.is_main else []
        if bad:  # the list behind the data/bad_* counts, with shards and keys
            listing = self.cfg.run_dir / "bad_samples.json"
            listing.write_text(json.dumps(bad, indent=1))
            tracker.log_file(listing, "data")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashdmd.train", description="Run stage 1 or stage 2 in this process "
                                     "(one rank; launchers start one per GPU).")
    parser.add_argument("--job", choices=JOBS, required=True)
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name in jobs/configs or a YAML path")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run directory's run even where this config differs from its config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_intermixed_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_cli(args.config, args.overrides, args.job)
    cfg.tracking.tags.setdefault("preset", Path(args.config).stem)
    os.environ.setdefault(COMMAND_ENV, " ".join(["python -m flashdmd.train", *(argv if argv is not None else sys.argv[1:])]))
    if args.resume:
        os.environ[RESUME_ENV] = "1"
    try:
        main(cfg, args.job)  # rank 0 logs the one "finished" line
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.job} interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
