"""data_tools/inspect_shards.py: the totals add up (samples = good + bad samples; shard-level problems apart)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_tools.inspect_shards import inspect
from data_tools.make_shards import write_shards
from data_tools.make_toy_shards import make_toy_shards, toy_samples

REPO = Path(__file__).resolve().parents[2]


def test_totals_add_up_with_bad_samples_and_a_truncated_shard(tmp_path: Path):
    folder = tmp_path / "shards"
    make_toy_shards(folder, count=6, per_shard=6, size=16, prefix="a")
    samples = list(toy_samples(4, size=16, start=100))
    samples[1]["png"] = b"not a png"  # corrupt_image
    del samples[2]["txt"], samples[2]["json"]  # missing_caption
    write_shards(samples, folder, "b")
    whole = (folder / "a-000000.tar").read_bytes()
    (folder / "c-000000.tar").write_bytes(whole[: len(whole) // 2])  # truncated_tar: a shard-level problem
    summary, _ = inspect(str(folder), resolution=16)
    assert summary["bad_counts"]["corrupt_image"] == 1 and summary["bad_counts"]["missing_caption"] == 1
    assert summary["bad_samples"] == 2 and summary["shard_problems"] == summary["bad_counts"]["truncated_tar"] == 1
    assert summary["samples"] == summary["good"] + summary["bad_samples"]
    assert summary["samples"] == sum(summary["per_shard"].values())
    out = subprocess.run([sys.executable, str(REPO / "data_tools" / "inspect_shards.py"), str(folder), "--resolution", "16"],
                         capture_output=True, text=True, check=True).stdout
    assert (f"3 shards, {summary['samples']} samples: {summary['good']} good, 2 bad; 1 shard-level problems"
            in out.splitlines()[0])
