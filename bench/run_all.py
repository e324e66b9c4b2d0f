"""Run every benchmark one after another and write bench/results/summary.md: each
figure against its goal, plus the planner's estimates beside the engines' measured bytes.

Each benchmark is its own process (``python bench/NAME.py``), so one failing does not stop the
others; its JSON in bench/results/ is what the summary reads, so ``--only`` reruns some and keeps
the rest. ``--quick`` shortens every run (a smoke test; the figures get noisier).

    python bench/run_all.py [--quick] [--only step_overhead flash_vs_dmd2 ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from _common import REPO, RESULTS

# name -> (full arguments, --quick arguments)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "step_overhead": ([], ["--iters", "8", "--warmup", "1"]),
    "flash_vs_dmd2": ([], ["--iters", "6", "--warmup", "1", "--memory-iters", "2"]),
    "zero3_memory": ([], ["--iters", "1"]),
    "data_throughput": ([], ["--samples", "128", "--batches", "40", "--repeats", "1"]),
    "tracking_overhead": ([], ["--repeats", "4"]),
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(figure: str, value: str, goal: str, met: bool | None) -> str:
    verdict = "-" if met is None else ("met" if met else "NOT met")
    return f"| {figure} | {value} | {goal} | {verdict} |"


def figures() -> list[str]:
    """One table row per issue-10 figure, from whatever result files exist."""
    rows = ["| figure | measured | goal | verdict |", "|---|---|---|---|"]
    step = _load("step_overhead")
    if step:
        rows.append(_row("trainer / hand-written loop, stage-1 iteration (tiny-sdxl, local)",
                         f"{step['ratio_median']:.3f} (quartiles {step['ratio_quartiles'][0]:.2f}..{step['ratio_quartiles'][1]:.2f}; "
                         f"weights differ by {step['max_weight_diff']:.2g})", "<= 1.05", step["goal_met"]))
    flash = _load("flash_vs_dmd2")
    if flash:
        rows.append(_row("Flash-DMD / DMD2 iteration time (tiny-sdxl, equal batch)",
                         f"{flash['ratio_mean']:.3f} (paper 1.075; gan_input=rollout_state: "
                         f"{flash['ratio_rollout_state_mean']:.3f})", "<= 1.075", flash["goal_met"]))
        rows.append(_row("Flash-DMD / DMD2 peak memory", f"{flash['memory_ratio']:.3f} ({flash['memory_measure']})",
                         "-", None))
    zero3 = _load("zero3_memory")
    if zero3:
        for kind in ("deepspeed", "fsdp"):
            r = zero3[kind]
            rows.append(_row(f"{kind} (2 ranks) per-rank trainable bytes / local", f"{r['ratio_total']:.3f}",
                             "<= 0.55", r["ratio_total"] <= 0.55))
            rows.append(_row(f"{kind} (2 ranks) step time / local", f"{r['step_s'] / zero3['local']['step_s']:.2f}",
                             "-", None))
    data = _load("data_throughput")
    if data and step:
        consumed = step["batch"] / step["trainer"]["median_s"]  # samples/s one trainer process takes
        for pipeline in ("image", "latent"):
            best = max(r["samples_per_s"] for r in data["rows"] if r["pipeline"] == pipeline)
            rows.append(_row(f"{pipeline} pipeline / trainer consumption (tiny default)",
                             f"{best / consumed:.0f}x ({best:.0f} vs {consumed:.1f} samples/s)", ">= 5x",
                             best / consumed >= 5))
    track = _load("tracking_overhead")
    if track:
        pct = track["overhead_paired_pct"]
        rows.append(_row("MLflow tracking step-time overhead",
                         f"{pct:.2f} % +- {track['overhead_paired_stderr_pct']:.2f} (main-thread CPU "
                         f"{track['overhead_main_thread_cpu_pct']:.2f} %)", "< 2 %", pct < 2.0))
    return rows


def planner_agreement() -> list[str]:
    """The planner's per-rank bytes beside zero3_memory's measured ones (tests/apps/test_planner.py
    asserts the local and FSDP2 agreement; this table shows DeepSpeed too)."""
    zero3 = _load("zero3_memory")
    if not zero3:
        return []
    sys.path.insert(0, str(REPO))
    from flashdmd.config import load_config
    from flashdmd.apps.plan import architecture, plan

    base = load_config("tiny-sdxl", ["model.lora.enabled=false"])
    arch = architecture(base)
    rows = ["| engine | network | kind | planned MiB | measured MiB (max rank) | planned / measured |",
            "|---|---|---|---|---|---|"]
    for kind in ("local", "fsdp", "deepspeed"):
        cfg = load_config("tiny-sdxl", ["model.lora.enabled=false", f"engine.kind={kind}"])
        planned = plan(cfg, zero3[kind]["world"], arch=arch, with_activations=False)
        for net in ("generator", "fake_score", "discriminator"):
            for field in ("params", "grads", "optimizer"):
                got = max(r["memory"][net][field] for r in zero3[kind]["ranks"])
                want = getattr(planned.row(net), field)
                rows.append(f"| {kind} | {net} | {field} | {want / 2**20:.3f} | {got / 2**20:.3f} | "
                            f"{want / got if got else float('nan'):.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES))
    args = parser.parse_args()
    status: dict[str, str] = {}
    for name in args.only or BENCHES:
        full, quick = BENCHES[name]
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *(quick if args.quick else full)], check=False,
                              cwd=REPO)
        status[name] = f"{'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'}, " \
                       f"{time.perf_counter() - started:.0f} s"
    lines = ["# Benchmark summary", "",
             ("Generated by `python bench/run_all.py`; every figure is measured side by side in one run on this "
             "machine (see each JSON in this folder for the raw times and the machine)."), ""]
    if status:
        lines += ["Runs: " + "; ".join(f"{k}: {v}" for k, v in status.items()), ""]
    lines += figures() + ["", "## Planner estimates against measured bytes (tiny-sdxl)", ""] + planner_agreement()
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any("FAILED" in v for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
