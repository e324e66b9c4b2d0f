"""Helpers the side-by-side benchmarks share: the tiny-sdxl config and fixed batch, interleaved
timing with medians, and the results file (bench/results/NAME.json).

Every figure is a ratio of two workloads measured in one process, alternating one iteration of
each, so load from other processes on the 2 shared cores hits both alike; medians drop the
iterations a neighbour's burst landed on.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
# One intra-op thread: on 2 cores shared with other work, two OpenMP threads per process spin
# against each other (a tiny-sdxl step measured 3.4 s with 2 threads vs 0.42 s with 1).
torch.set_num_threads(1)

PROMPTS = ["a red car", "a cat on a mat", "a bowl of fruit", "a blue house", "a green tree", "a small dog"]


def tiny_config(overrides: list[str] = (), preset: str = "tiny-sdxl") -> Any:
    """``preset`` with its tiny weights cached in a temporary folder and a constant learning rate
    (the hand-written loops do not re-implement warm-up schedules)."""
    from flashdmd.config import load_config

    root = tempfile.mkdtemp(prefix="flashdmd-bench-")
    return load_config(preset, [f"run_root={root}", f"model.cache_dir={root}/cache", "stage1.warmup_steps=0",
                                "stage1.lr_schedule=constant", *overrides])


def fixed_batch(parts: Any, size: int, resolution: int, device: torch.device) -> Any:
    """One batch reused every iteration: prompts encoded once, fixed real pixels."""
    from flashdmd.algo.batch import Batch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = {k: v.to(device) for k, v in parts.encode_prompts(prompts).items()}
        uncond = {k: v.to(device) for k, v in parts.null_cond(size).items()}
    real = (torch.rand(size, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    return Batch(cond=cond, uncond=uncond, real=real, size=size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(workloads: dict[str, Callable[[int], Any]], iters: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each workload, calling them in turn (A B A B ...) with step = i."""
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for i in range(warmup + iters):
        order = list(workloads.items())
        if i % 2:
            order.reverse()  # neither workload always runs right after the other
        for name, fn in order:
            sync(device)
            start = time.perf_counter()
            fn(i)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "n": len(times)}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-iteration ratios (each pair ran back to back)."""
    return statistics.median(a / b for a, b in zip(num, den))


def machine() -> dict[str, Any]:
    return {"device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def write_result(name: str, data: dict[str, Any], table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**data, "machine": machine(), "table": table}, indent=1))
    print(table)
    print(f"wrote {path}")
    return path
