"""The fault matrix: inject each fault into a real run, check what survived, tabulate.

Runs the scenarios of ``tests/fault/scenarios.py`` (the same code the fault tests assert on):
kill -9 of one of two DDP ranks mid-step and mid-save, NaN/Inf losses and gradients (one step,
one rank of two, three in a row -> rollback, stop policy), training-health monitors, 100 mutated
preset configs, corrupt data at 0.1 / 1 / 10 % (the image stream over a full epoch, and a
tiny-sdxl training run), the MLflow server killed and restarted mid-run,
and a foreign checkpoint. Columns: fault, outcome, steps lost (training steps missing from the
final weights or the MLflow record: must be 0), steps redone (completed after the last valid
checkpoint and computed again after the resume, at most checkpoint.every), data lost (metrics,
checkpoints or samples that could not be recovered).

    python bench/fault_matrix.py [--only kill,nonfinite,...] [--out bench/results/fault_matrix.json]
    # writes the JSON (rows with details) and <out>.md (the table), prints the table
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests" / "worlds", REPO / "tests" / "fault"):
    sys.path.insert(0, str(path))

import scenarios
from scenarios import Row

GROUPS: dict[str, Callable[[Path, Path], list[Row]]] = {
    "kill": lambda tmp, cache: [scenarios.kill_rank(tmp, cache, "step"), scenarios.kill_rank(tmp, cache, "save")],
    "nonfinite": lambda tmp, cache: [
        scenarios.nonfinite_skip(tmp, cache, "nan_loss@3", "NaN loss"),
        scenarios.nonfinite_skip(tmp, cache, "inf_grad@3:net=fake_score", "Inf gradients"),
        scenarios.nonfinite_two_ranks(tmp, cache),
        scenarios.nonfinite_rollback(tmp, cache),
        scenarios.nonfinite_stop(tmp, cache),
    ],
    "health": lambda tmp, cache: [scenarios.health_monitors(tmp, cache)],
    "configs": lambda tmp, cache: [scenarios.bad_configs(tmp / "configs")[0]],
    "data": lambda tmp, cache: [scenarios.corrupt_data(tmp, rate) for rate in (0.001, 0.01, 0.1)]
    + [scenarios.corrupt_training(tmp, tmp / "tiny-cache", rate) for rate in (0.001, 0.01, 0.1)],
    "mlflow": lambda tmp, cache: [scenarios.mlflow_outage(tmp, cache)],
    "checkpoints": lambda tmp, cache: [scenarios.foreign_checkpoint(tmp, cache)],
}


def table(rows: list[Row]) -> str:
    lines = ["| fault | outcome | steps lost | steps redone | data lost |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.fault} | {r.outcome} | {r.steps_lost} | {r.steps_redone} | {'yes' if r.data_lost else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fault_matrix.json")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        root = Path(tmp)
        cache = scenarios.build_cache(root / "cache")
        for group in groups:
            (root / group).mkdir()
            for row in GROUPS[group](root / group, cache):
                print(f"{row.fault}: {row.outcome} ({row.seconds:.1f} s)", flush=True)
                rows.append(row)
    text = table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": [r.to_dict() for r in rows], "all_clean": all(r.steps_lost == 0 and not r.data_lost for r in rows),
        "seconds": time.perf_counter() - started, "host": platform.node(), "python": platform.python_version(),
    }, indent=1, default=str))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0 if all(r.steps_lost == 0 and not r.data_lost for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
