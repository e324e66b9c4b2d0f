"""How fast the command lines answer ``--help``: ``jobs/submit.py`` and the planner, beside a bare
``python -c pass`` (the interpreter's own start-up) measured in turn with them.

jobs/submit.py parses its arguments before it imports anything heavy (torch loads only once a
job is resolved and checked), so its help should cost a few start-ups of the interpreter; the
planner imports torch with its module and is listed for comparison. Each figure is the median
wall time of a fresh process, and its ratio to the baseline measured back to back with it.

    python bench/cli_help.py [--iters 7] [--warmup 1]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from _common import REPO, interleaved, paired_ratio, summary, write_result

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "jobs/submit.py --help": [sys.executable, str(REPO / "jobs" / "submit.py"), "--help"],
    "python -m flashdmd.planner --help": [sys.executable, "-m", "flashdmd.planner", "--help"],
}
BASELINE = "python -c pass"
GOAL_S = 2.0  # jobs/submit.py --help on an idle machine


def _runner(cmd: list[str]):
    def run(_: int) -> None:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    times = interleaved({name: _runner(cmd) for name, cmd in COMMANDS.items()}, args.iters, args.warmup,
                        torch.device("cpu"))
    results = {name: {**summary(t), "ratio_to_baseline": paired_ratio(t, times[BASELINE])} for name, t in times.items()}
    submit = results["jobs/submit.py --help"]
    rows = ["| command | median s | x `python -c pass` |", "|---|---|---|"]
    rows += [f"| `{name}` | {r['median_s']:.3f} | {r['ratio_to_baseline']:.1f} |" for name, r in results.items()]
    write_result("cli_help", {"commands": results, "goal_s": GOAL_S, "goal_met": submit["median_s"] < GOAL_S,
                              "iters": args.iters, "times_s": times}, "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
