"""Benchmark: iteration cost and peak memory of Flash-DMD against the real DMD2 baseline
(``stage1.mode=dmd2``: DMD2's classifier on the fake score, spec 4.2) at equal batch and TTUR.
The paper reports 6.42 s vs 5.97 s per iteration (ratio 1.075) on SDXL; goal: ratio <= 1.075.

Two measures: ``sdxl_flop_ratio``, the planner's FLOP count (flashdmd/apps/plan_flops.py) of the
sdxl-4step preset at its own launch size against the same preset in dmd2 mode (the goal's
figure: tiny networks do not have SDXL's cost shares, the 1024 px VAE decode above all), and
the measured iteration-time ratio on tiny-sdxl below.

Both modes run the real ``Stage1`` on tiny-sdxl with the local engine, each on its own copy of
the networks, same batch, same TTUR (the preset's) and seed; only ``stage1.mode`` differs. Time:
one process, iterations alternating between the modes. Each mode draws its student step per
iteration (DMD2 from all four steps, Flash-DMD's DM branch from the three noisy ones plus a GAN
branch), so per-iteration work varies by design: the figure is the ratio of mean iteration
times (medians are reported too). Peak memory: with CUDA, ``max_memory_allocated`` per mode in
the same process; on CPU, the peak resident set of one child process per mode running the same
iterations (a process's peak cannot be split by mode), reported as the peak above the resident
set after setup (networks and text encoders loaded, before the first step).

    python bench/flash_vs_dmd2.py [--iters 24] [--warmup 2] [--batch 2]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from _common import fixed_batch, interleaved, summary, tiny_config, write_result

GOAL, PAPER = 1.075, {"flash_s": 6.42, "dmd2_s": 5.97}
# variant -> overrides; "flash" is the preset's Flash-DMD with the default GAN branch (the
# rollout's own state as input, half the batch), the goal's numerator; "flash_full_gan" runs the
# branch on the whole batch; "flash_paper_gan" is the paper's branch (rolled out to x_0, whole batch)
MODES = {"flash": ["stage1.mode=flash"], "flash_full_gan": ["stage1.mode=flash", "stage1.gan_batch_fraction=1.0"],
         "flash_paper_gan": ["stage1.mode=flash", "stage1.gan_input=rollout_to_zero", "stage1.gan_batch_fraction=1.0"],
         "dmd2": ["stage1.mode=dmd2"], "dmd2_pixelgan": ["stage1.mode=dmd2_pixelgan"]}
SDXL_PRESET = "sdxl-4step"


def sdxl_flop_ratios() -> dict[str, float]:
    """Planner FLOPs per iteration of each Flash variant / the same preset in dmd2 mode, at the
    preset's launch size (nodes x GPUs per node)."""
    from flashdmd.apps.plan import plan
    from flashdmd.config import load_config

    out = {}
    for mode in ("flash", "flash_full_gan", "flash_paper_gan"):
        cfg = load_config(SDXL_PRESET, MODES[mode])
        out[mode] = plan(cfg, cfg.launch.nodes * cfg.launch.gpus_per_node).flops_ratio
    return out


def build(mode: str, batch_size: int, device: torch.device) -> tuple[Any, Any]:
    """(Stage1 of variant ``mode`` on its own networks and local engine, the fixed batch)."""
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.engine.factory import optim_specs
    from flashdmd.engine.local import LocalEngine
    from flashdmd.nets.registry import build_parts

    cfg = tiny_config([*MODES[mode], f"data.batch_size={batch_size}", "engine.kind=local"])
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg, Path(cfg.model.cache_dir))
    engine = LocalEngine(device)
    engine.setup(parts.trainable(), optim_specs(cfg), parts.frozen())
    return Stage1(cfg.stage1, parts, engine, cfg.seed), fixed_batch(parts, batch_size, cfg.data.resolution, device)


def cpu_peaks(runs: dict[str, tuple[Any, Any]], first_step: int, iters: int) -> dict[str, dict[str, int]]:
    """Peak live bytes allocated inside one iteration, max over ``iters`` iterations per mode."""
    from _memory import PeakLiveBytes

    peaks = {}
    for mode, (algo, batch) in runs.items():
        peak = 0
        for step in range(first_step, first_step + iters):
            with PeakLiveBytes() as probe:
                algo.step(step, batch)
            peak = max(peak, probe.peak)
        peaks[mode] = {"peak_live_bytes": peak}
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--memory-iters", type=int, default=8, help="untimed iterations per mode for CPU peaks")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = {mode: build(mode, args.batch, device) for mode in MODES}
    peaks: dict[str, dict[str, int]] = {}

    def workload(mode: str):
        algo, batch = runs[mode]

        def run(step: int) -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            algo.step(step, batch)
            if device.type == "cuda":
                peak = peaks.setdefault(mode, {"peak_allocated": 0})
                peak["peak_allocated"] = max(peak["peak_allocated"], torch.cuda.max_memory_allocated(device))
        return run

    times = interleaved({mode: workload(mode) for mode in MODES}, args.iters, args.warmup, device)
    if device.type != "cuda":
        peaks = cpu_peaks(runs, args.warmup + args.iters, args.memory_iters)
    stats = {mode: summary(times[mode]) for mode in MODES}
    ratio = stats["flash"]["mean_s"] / stats["dmd2"]["mean_s"]
    ratio_median = stats["flash"]["median_s"] / stats["dmd2"]["median_s"]
    key = "peak_allocated" if device.type == "cuda" else "peak_live_bytes"
    mem_ratio = peaks["flash"][key] / peaks["dmd2"][key]
    rows = ["| mode | mean s/it | median s/it | min s/it | peak memory MiB |", "|---|---|---|---|---|"]
    for mode in MODES:
        s = stats[mode]
        rows.append(f"| {mode} | {s['mean_s']:.4f} | {s['median_s']:.4f} | {s['min_s']:.4f} | "
                    f"{peaks[mode][key] / 2**20:.1f} |")
    what = "max_memory_allocated" if device.type == "cuda" else "peak live bytes allocated within an iteration"
    alt = {m: stats[m]["mean_s"] / stats["dmd2"]["mean_s"] for m in MODES if m != "dmd2"}
    flops = sdxl_flop_ratios()
    rows += [(f"\n{SDXL_PRESET} planner FLOPs, flash / dmd2: {flops['flash']:.3f} (goal <= {GOAL} -> "
              f"{'met' if flops['flash'] <= GOAL else 'NOT met'}; paper {PAPER['flash_s'] / PAPER['dmd2_s']:.3f}); "
              + ", ".join(f"{m} {v:.3f}" for m, v in flops.items() if m != "flash")),
             f"tiny-sdxl flash / dmd2 iteration time: {ratio:.3f} (means), {ratio_median:.3f} (medians)",
             "tiny-sdxl other variants / dmd2 (means): " + ", ".join(f"{m} {v:.3f}" for m, v in alt.items() if m != "flash"),
             f"flash / dmd2 peak memory ({what}): {mem_ratio:.3f}"]
    write_result("flash_vs_dmd2", {
        "preset": "tiny-sdxl", "batch": args.batch, "iters": args.iters, "warmup": args.warmup, "stats": stats,
        "sdxl_preset": SDXL_PRESET, "sdxl_flop_ratio": flops["flash"], "sdxl_flop_ratios": flops,
        "tiny_time_ratio": ratio, "ratio_mean": ratio, "ratio_median": ratio_median, "ratio_variants_mean": alt,
        "peaks": peaks, "memory_ratio": mem_ratio, "memory_measure": what, "goal": GOAL,
        "goal_met": flops["flash"] <= GOAL, "paper": PAPER, "times": times,
        "spread": {m: statistics.pstdev(times[m]) for m in MODES}, "variants": MODES,
    }, "\n".join(rows))


if __name__ == "__main__":
    main()
