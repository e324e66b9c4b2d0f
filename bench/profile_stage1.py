"""Profile of the stage-1 hot path: what one trainer iteration spends its time
on, beyond the networks' own arithmetic.

Runs the trainer's per-iteration path on tiny-sdxl with the local engine and real toy shards
(``ImageBatches.next_batch`` -> ``Stage1.step`` -> run metrics -> preemption agreement) under the
torch profiler and cProfile, after ``--warmup`` iterations. Reports per iteration: the top
operators by self CPU time, text encodings (``PromptEncoder.forward`` calls), the Python
functions of this repository with the most own time, and, line by line in this repository,
every read of a tensor's value into Python (``.item()``, ``float(t)``, ``.tolist()``, ``bool``:
a host-device synchronisation on a GPU) and every ``.to``/``.clone``/``.contiguous`` that made
a copy. (The profiler's ``aten::_local_scalar_dense`` count is reported as well, but on CPU it is
dominated by AdamW reading its per-parameter step counters, which live on the host even on GPUs.)
Writes bench/results/profile_stage1.json and prints the summary.

    python bench/profile_stage1.py [--iters 5] [--warmup 2]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import REPO, tiny_config, write_result
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

SYNC_OP, COPY_OP = "aten::_local_scalar_dense", "aten::copy_"
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "numpy"}
COPIES = {"to", "clone", "contiguous", "cpu", "cuda"}
PACKAGE = str(REPO / "flashdmd")


class HostReadsAndCopies(TorchFunctionMode):
    """Counts, per line of this repository's code, tensor reads into Python and copying calls."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.copies: Counter[str] = Counter()

    @staticmethod
    def _where() -> str:
        frame = sys._getframe(2)
        while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
            frame = frame.f_back
        if frame is None:
            return "(outside flashdmd)"
        return f"{Path(frame.f_code.co_filename).relative_to(REPO)}:{frame.f_lineno}"

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads[self._where()] += 1
        elif name in COPIES and args and out is not args[0]:
            self.copies[self._where()] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from data_tools.make_toy_shards import make_toy_shards
    from flashdmd.infra.distributed import init_distributed, shutdown
    from flashdmd.nets.text import PromptEncoder
    from flashdmd.train.preemption import Preemption
    from flashdmd.train.batches import build_batches
    from flashdmd.train.main import Trainer

    shards = Path(tempfile.mkdtemp(prefix="flashdmd-profile-"))
    make_toy_shards(shards, 64, 8)
    cfg = tiny_config([f"data.shards={shards}/toy-{{000000..000007}}.tar", "engine.kind=local"])
    ctx = init_distributed(cfg)
    encodes = Counter()
    original = PromptEncoder.forward

    def counted(self, prompts):  # type: ignore[no-untyped-def]
        encodes["calls"] += 1
        return original(self, prompts)

    PromptEncoder.forward = counted
    try:
        trainer = Trainer(cfg, "stage1", ctx)
        trainer._setup()
        batches = build_batches(cfg, trainer.parts, ctx.rank, ctx.world_size, ctx.device)
        preemption = Preemption(cfg, ctx)

        def iteration(step: int) -> None:
            started = time.perf_counter()
            batch = batches.next_batch(step)
            metrics = trainer.algo.step(step, batch)
            trainer._run_metrics(metrics, time.perf_counter() - started, batch.size, batches.bad_counts())
            preemption.should_stop(step + 1)

        for step in range(args.warmup):
            iteration(step)
        encodes.clear()
        steps = range(args.warmup, args.warmup + args.iters)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for step in steps:
                iteration(step)
            wall = (time.perf_counter() - started) / args.iters
        python = cProfile.Profile()
        python.enable()
        for step in range(steps.stop, steps.stop + args.iters):
            iteration(step)
        python.disable()
        tally = HostReadsAndCopies()
        with tally:
            for step in range(steps.stop + args.iters, steps.stop + 2 * args.iters):
                iteration(step)
    finally:
        PromptEncoder.forward = original
        shutdown()

    events = prof.key_averages()
    per_iter = {e.key: e.count / args.iters for e in events}
    total_self = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    ops = [{"op": e.key, "calls_per_iter": e.count / args.iters,
            "self_ms_per_iter": e.self_cpu_time_total / 1e3 / args.iters,
            "share": e.self_cpu_time_total / total_self} for e in top]
    stats = pstats.Stats(python)
    ours = []
    for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if file.startswith(str(REPO / "flashdmd")):
            ours.append({"function": f"{Path(file).relative_to(REPO)}:{line}({name})", "calls_per_iter": calls / args.iters,
                         "own_ms_per_iter": own * 1e3 / args.iters, "cum_ms_per_iter": cum * 1e3 / args.iters})
    ours.sort(key=lambda r: r["own_ms_per_iter"], reverse=True)
    result = {
        "preset": "tiny-sdxl", "iters": args.iters, "wall_s_per_iter": wall,
        "local_scalar_dense_per_iter": per_iter.get(SYNC_OP, 0.0), "copy_ops_per_iter": per_iter.get(COPY_OP, 0.0),
        "text_encodings_per_iter": encodes["calls"] / args.iters / 3,  # counted over the three measured loops
        "host_reads_per_iter": {k: v / args.iters for k, v in tally.reads.most_common()},
        "copies_per_iter": {k: v / args.iters for k, v in tally.copies.most_common()},
        "top_ops": ops, "top_repo_functions": ours[:12],
    }
    lines = [f"stage-1 trainer iteration (tiny-sdxl, local, toy shards): {wall:.3f} s under the profiler",
             (f"per iteration: {SYNC_OP} {result['local_scalar_dense_per_iter']:.0f} (mostly AdamW step counters), "
             f"{COPY_OP} {result['copy_ops_per_iter']:.0f}, text encodings {result['text_encodings_per_iter']:.1f}"),
             f"tensor reads into Python from flashdmd code: {sum(tally.reads.values()) / args.iters:.1f} per iteration",
             *(f"  {n / args.iters:5.1f}  {where}" for where, n in tally.reads.most_common()),
             f"copying .to/.clone/.contiguous from flashdmd code: {sum(tally.copies.values()) / args.iters:.1f} per iteration",
             *(f"  {n / args.iters:5.1f}  {where}" for where, n in tally.copies.most_common(10)),
             "", "| op | calls/it | self ms/it | share |", "|---|---|---|---|"]
    lines += [f"| {o['op']} | {o['calls_per_iter']:.0f} | {o['self_ms_per_iter']:.1f} | {o['share']:.1%} |" for o in ops]
    lines += ["", "| repository function | calls/it | own ms/it | cumulative ms/it |", "|---|---|---|---|"]
    lines += [f"| {r['function']} | {r['calls_per_iter']:.0f} | {r['own_ms_per_iter']:.2f} | {r['cum_ms_per_iter']:.1f} |"
              for r in ours[:12]]
    write_result("profile_stage1", result, "\n".join(lines))


if __name__ == "__main__":
    main()
