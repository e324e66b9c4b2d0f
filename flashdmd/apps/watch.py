"""Evaluate a training run's checkpoints as they appear: the "watch" job.

A side job next to training (``python jobs/submit.py watch`` with the training run's config, or
``python -m flashdmd.apps.watch``) polls the run's checkpoint directory every ``eval.poll_s``
seconds and evaluates each new valid step directory (every one, or with ``eval.every = N`` only
steps divisible by N) exactly as the eval job does (``flashdmd.apps.evaluate``): the same prompt set,
seeds and metrics, results under ``<run>/eval/step-<N>`` and ``eval/<metric>`` points at the
training step in the run's one eval run in MLflow, so runs compare by metric in the MLflow UI.

The networks are built once; each checkpoint only loads the generator's weights, from the step
directory of whatever engine wrote it (flashdmd.engine.checkpoint_reader), so every intermediate
checkpoint is evaluated, not only the hand-over. Steps that
already have ``results.json`` are skipped, so a restarted watcher continues where it stopped.
Rank 0 decides what to do next and broadcasts it, so all ranks evaluate the same step. A step
directory pruned by training while it is being read (``checkpoint.keep_last``) is skipped on
every rank (the ranks agree with one all-reduce). The watcher stops once the run's hand-over
``final/`` exists and every step is evaluated (the final step too), or after
``eval.watch_timeout_s`` without a new checkpoint (0: no time limit). ``--weights ema|raw``
chooses the generator's EMA or raw weights (default: the EMA where a checkpoint has it, spec 6 #20);
a step counts as evaluated when it has results for that choice (either, by default).
"""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from flashdmd.train.checkpoint import step_dirs
from flashdmd.apps.cli import app_parser, exit_code, on_ranks, parse_app_args
from flashdmd.config import Config
from flashdmd.infra.distributed import DistContext, barrier
from flashdmd.apps.evaluate import RESULTS_JSON, EvalResult, eval_root, evaluate_source
from flashdmd.train.handoff import FINAL, META
from flashdmd.apps.sample import Student, StudentSource, add_weights_flag, default_source, find_student, new_student

log = logging.getLogger("flashdmd.apps.watch")


def checkpoint_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


STEP_FOLDER = re.compile(r"^step-(\d{8})(-ema)?$")  # flashdmd.apps.evaluate.step_folder


def evaluated_steps(cfg: Config, run_dir: Path, weights: str = "") -> set[int]:
    """Steps whose results exist (``<eval root>/step-N[-ema]/results.json``) for ``weights`` ("": either)."""
    steps = set()
    for path in eval_root(cfg, run_dir).glob(f"step-*/{RESULTS_JSON}"):
        match = STEP_FOLDER.match(path.parent.name)
        if match and (not weights or (match.group(2) is not None) == (weights == "ema")):
            steps.add(int(match.group(1)))
    return steps


def next_source(cfg: Config, run_dir: Path, done: set[int], weights: str = "") -> StudentSource | None:
    """The oldest valid checkpoint not yet evaluated (honouring ``eval.every``), else an unevaluated hand-over."""
    every = cfg.eval.every
    for step, path in step_dirs(checkpoint_dir(cfg, run_dir)):
        if step in done or (every and step % every):
            continue
        try:
            return find_student(path, weights)
        except (FileNotFoundError, OSError, ValueError):  # partial (no marker yet) or pruned meanwhile
            continue
    if (run_dir / FINAL / META).is_file():
        final = find_student(run_dir / FINAL, weights)
        return None if final.step in done else final
    return None


def _agree(ok: bool, device: torch.device) -> bool:
    """True when every rank succeeded (the flag lives on ``device``: NCCL reduces device tensors only)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _broadcast(decision: list[object]) -> list[object]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    return decision


def watch(cfg: Config, rank: int, world_size: int, device: torch.device, run_dir: Path,
          weights: str = "") -> list[EvalResult]:
    """Collective: evaluate new checkpoints of ``run_dir`` until the run is finished (see module doc)."""
    done = evaluated_steps(cfg, run_dir, weights) if rank == 0 else set()
    student: Student | None = None
    results: list[EvalResult] = []
    last_new = time.monotonic()
    while True:
        decision: list[object] = [None, False]  # [source to evaluate, stop]
        if rank == 0:
            source = next_source(cfg, run_dir, done, weights)
            finished = (run_dir / FINAL / META).is_file()
            timed_out = cfg.eval.watch_timeout_s > 0 and time.monotonic() - last_new > cfg.eval.watch_timeout_s
            decision = [source, source is None and (finished or timed_out)]
        source, stop = _broadcast(decision)
        if stop:
            return results
        if source is None:
            time.sleep(cfg.eval.poll_s)
            continue
        last_new = time.monotonic()
        if student is None:
            student = new_student(cfg, source, device) if rank == 0 else None  # rank 0 first: tiny caches
            barrier()
            student = student or new_student(cfg, source, device)
        try:
            student.load(source, cfg)
            loaded = True
        except (FileNotFoundError, OSError, SafetensorError) as err:
            log.warning("step %d: cannot read %s (%s); skipped", source.step, source.folder, err)
            loaded = False
        if _agree(loaded, device):
            results.append(evaluate_source(cfg, student, rank, world_size))
        done.add(source.step)


def main(cfg: Config, job: str = "watch", weights: str = "") -> list[EvalResult]:
    """Launcher entry (every rank): watch ``eval.source`` (a run directory; "" -> ``sampling.default_source``)."""
    def body(ctx: DistContext) -> list[EvalResult]:
        run_dir = Path(cfg.eval.source) if cfg.eval.source else default_source(cfg, job, need_student=False)
        return watch(cfg, ctx.rank, ctx.world_size, ctx.device, run_dir, weights)

    return on_ranks(cfg, body, wait_for_all=True)


def cli(argv: list[str] | None = None) -> int:
    parser = app_parser("watch", "Evaluate a training run's checkpoints as they appear.")
    parser.add_argument("--run-dir", default="", help="the training run directory (eval.source)")
    add_weights_flag(parser)
    args, cfg = parse_app_args(parser, argv)
    cfg.eval.source = args.run_dir or cfg.eval.source
    return exit_code("watch", lambda: main(cfg, "watch", args.weights), lambda results: f"evaluated steps {[r.step for r in results]}")


if __name__ == "__main__":
    sys.exit(cli())
