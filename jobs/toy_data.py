"""The tiny presets' toy shards, made on first use so ``python jobs/submit.py stage1`` works on a fresh clone.

The tiny presets read ``runs/data/toy-{000000..000007}.tar`` (captioned coloured shapes from
data_tools/make_toy_shards.py, 32 samples per shard, as scripts/demo.sh writes them). When a
training job's ``data.shards`` is such a toy pattern and none of its shards exists, they are
written before the pre-submission checks, with one line saying so. Any other missing shards stay
an error of the checks (flashdmd.apps.preflight): real data is never invented.
"""
from __future__ import annotations

import re
from pathlib import Path

from flashdmd.config import Config

TOY_PATTERN = re.compile(r"^(?P<prefix>toy)-\{000000\.\.(?P<last>\d{6})\}\.tar$")
PER_SHARD = 32
TRAINING_JOBS = ("stage1", "stage2")


def missing_toy_shards(cfg: Config) -> tuple[Path, int] | None:
    """(folder, number of shards) when ``cfg`` reads toy shards of which none exists, else None."""
    pattern = Path(cfg.data.shards)
    match = TOY_PATTERN.match(pattern.name) if cfg.data.shards and cfg.model.family.startswith("tiny") else None
    if match is None:
        return None
    count = int(match["last"]) + 1
    if any((pattern.parent / f"toy-{i:06d}.tar").exists() for i in range(count)):
        return None
    return pattern.parent, count


def make_missing_toy_shards(configs: list[tuple[str, Config]]) -> None:
    """Write the toy shards that the training jobs of ``configs`` read and that do not exist yet."""
    from data_tools.make_toy_shards import make_toy_shards

    done: set[Path] = set()
    for job, cfg in configs:
        found = missing_toy_shards(cfg) if job in TRAINING_JOBS else None
        if found is None or found[0].resolve() in done:
            continue
        folder, count = found
        print(f"making the toy shards of the tiny presets: {count} shards of {PER_SHARD} captioned {cfg.data.resolution}-px "
              f"images in {folder} (data_tools/make_toy_shards.py; made once)", flush=True)
        make_toy_shards(folder, count * PER_SHARD, PER_SHARD, size=cfg.data.resolution)
        done.add(folder.resolve())
