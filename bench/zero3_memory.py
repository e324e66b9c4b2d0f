"""Benchmark: per-rank memory of the three trainable networks under ZeRO-3 and FSDP2 on 2 ranks
against the local engine, and the stage-1 step-time ratio (a benchmark, not a test).

For each engine it builds the tiny-sdxl family (or ``--preset``), runs ``--warmup`` stage-1
iterations (so optimizer state exists), reads ``engine.memory_report()`` on every rank, then
times ``--iters`` more iterations. Each rank gets the same per-rank batch as the one local
process, so the time ratio shows the cost of sharding, not of a different batch.

Goal: sharded total bytes per rank <= 0.55 of local. On CPU compute is fp32 and
DeepSpeed keeps its fp32 master partition next to the fp32 parameter partition, counted under
"optimizer". Writes bench/results/zero3_memory.json and .md and prints the table.

    python bench/zero3_memory.py [--preset tiny-sdxl] [--iters 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashdmd.algo.batch import Batch
from flashdmd.config import load_config

PROMPTS = ["a red car", "a cat on a mat", "a bowl of fruit", "a blue house"]
KINDS = ("local", "fsdp", "deepspeed")


def _batch(parts, step: int, per_rank: int) -> Batch:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        cond, uncond = parts.encode_prompts(PROMPTS[:per_rank]), parts.null_cond(per_rank)
    return Batch(cond=cond, uncond=uncond, real=torch.rand(per_rank, 3, 64, 64, generator=g) * 2 - 1, size=per_rank)


def measure(kind: str, preset: str, cache: str, warmup: int, iters: int) -> dict:
    """One engine on this process group: memory report after warm-up, mean step time."""
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.engine import common
    from flashdmd.engine.factory import build_engine, optim_specs
    from flashdmd.nets.registry import build_parts

    cfg = load_config(preset, [f"engine.kind={kind}", f"model.cache_dir={cache}", "model.lora.enabled=false"])
    torch.manual_seed(0)
    parts = build_parts(cfg, Path(cache))
    engine = build_engine(cfg)
    engine.setup(parts.trainable(), optim_specs(cfg), parts.frozen())
    algo = Stage1(cfg.stage1, parts, engine, cfg.seed)
    per_rank = cfg.data.batch_size
    for step in range(warmup):
        algo.step(step, _batch(parts, step, per_rank))
    report = engine.memory_report() if hasattr(engine, "memory_report") else common.replica_memory(engine.modules, engine.optimizers)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for step in range(warmup, warmup + iters):
        algo.step(step, _batch(parts, step, per_rank))
    if dist.is_initialized():
        dist.barrier()
    return {"memory": report, "step_s": (time.perf_counter() - start) / iters}


def _worker(rank: int, world: int, port: int, kind: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = measure(kind, args.preset, args.cache, args.warmup, args.iters)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (DeepSpeed/gloo threads can abort at exit)


def run(kind: str, world: int, args: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(Path(args.cache) / f"{kind}.json")
    mp.start_processes(_worker, args=(world, port, kind, args, out), nprocs=world, join=True, start_method="spawn")
    return json.loads(Path(out).read_text())


def table(results: dict) -> str:
    local = results["local"]["ranks"][0]["memory"]
    lines = ["| engine | rank | network | params MiB | grads MiB | optimizer MiB | total MiB | total / local |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        for rank, entry in enumerate(results[kind]["ranks"]):
            for net, mem in sorted(entry["memory"].items()):
                total, ref = sum(mem.values()), sum(local[net].values())
                lines.append(f"| {kind} | {rank} | {net} | {mem['params'] / 2**20:.2f} | {mem['grads'] / 2**20:.2f} | "
                             f"{mem['optimizer'] / 2**20:.2f} | {total / 2**20:.2f} | {total / ref:.3f} |")
    lines.append("")
    lines.append("| engine | world | max rank total / local (all networks) | step s | step time / local |")
    lines.append("|---|---|---|---|---|")
    for kind in KINDS:
        r = results[kind]
        lines.append(f"| {kind} | {r['world']} | {r['ratio_total']:.3f} | {r['step_s']:.2f} | {r['step_s'] / results['local']['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-sdxl")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "zero3_memory.json"))
    args = parser.parse_args()
    args.cache = tempfile.mkdtemp(prefix="zero3-bench-")
    from flashdmd.nets.registry import build_parts

    build_parts(load_config(args.preset, [f"model.cache_dir={args.cache}", "model.lora.enabled=false"]), Path(args.cache))
    results: dict = {}
    for kind in KINDS:
        world = 1 if kind == "local" else 2
        ranks = run(kind, world, args)
        results[kind] = {"world": world, "ranks": ranks, "step_s": max(r["step_s"] for r in ranks)}
    local_total = sum(sum(m.values()) for m in results["local"]["ranks"][0]["memory"].values())
    for kind in KINDS:
        worst = max(sum(sum(m.values()) for m in r["memory"].values()) for r in results[kind]["ranks"])
        results[kind]["ratio_total"] = worst / local_total
    results["goal"] = "sharded total per rank <= 0.55 x local"
    results["device"] = "cpu (fp32), gloo"
    text = table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
