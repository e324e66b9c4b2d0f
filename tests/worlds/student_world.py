"""Shared fixtures for the export, sampling and evaluation tests.

``trained_run``: a real 2-iteration tiny-sdxl stage-1 run (toy shards, checkpoints at steps 1 and
2, the ``final/`` hand-over), built once per test session. ``synthetic_handoff`` writes a hand-over
with ``flashdmd.train.handoff.write_handoff`` for a generator whose weights were moved away from the
teacher's (cheaper than training, for the families other than tiny-sdxl). ``tiny_clip`` and
``tiny_image_reward`` (tests/worlds/tiny_metric_models.py) save random-weight metric models.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow_store import migrated_store

from flashdmd.config import REPO_ROOT, Config, load_config
from flashdmd.engine.base import OptimSpec
from flashdmd.engine.local import LocalEngine
from flashdmd.nets.registry import build_parts
from flashdmd.train.handoff import write_handoff

PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "two dogs", "a house"]


def run_config(root: Path, *overrides: str, preset: str = "tiny-sdxl", name: str = "run") -> Config:
    return load_config(preset, [f"run_root={root}", f"name={name}", f"model.cache_dir={root / 'cache'}", *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Config, Path]:
    from flashdmd.train.main import main

    root = tmp_path_factory.mktemp("trained")
    migrated_store(root)  # the evaluation tests add their runs to this store too
    shards = root / "shards"
    subprocess.run([sys.executable, str(REPO_ROOT / "data_tools" / "make_toy_shards.py"), str(shards), "--count", "16",
                    "--per-shard", "8", "--size", "64"], check=True, capture_output=True)
    cfg = run_config(root, f"data.shards={shards}/toy-{{000000..000001}}.tar", "stage1.iterations=2",
                     "checkpoint.every=1", "checkpoint.keep_last=3", "tracking.sample_every=0")
    main(cfg, "stage1")
    return cfg, cfg.run_dir


def synthetic_handoff(root: Path, preset: str, *overrides: str, step: int = 7) -> tuple[Config, Path]:
    """A hand-over whose generator is the teacher plus small seeded noise on its trainable tensors."""
    cfg = run_config(root, *overrides, preset=preset)
    parts = build_parts(cfg, root / "cache")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in parts.generator.parameters():
            if p.requires_grad:  # with LoRA: the adapters only (the hand-over holds nothing else)
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    engine = LocalEngine("cpu")
    engine.setup({"generator": parts.generator}, {"generator": OptimSpec(lr=1e-8)}, {})
    write_handoff(engine, {"generator": parts.generator}, cfg, step, None)
    return cfg, cfg.run_dir
