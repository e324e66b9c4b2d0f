"""Consolidate a step directory into plain safetensors: ``python -m flashdmd.apps.consolidate STEP_DIR OUT``.

For users who want full weights without flashdmd's loaders: every trainable network of a step
directory written by any engine at any world size (or of a ``final/`` hand-over) becomes
``OUT/<network>.safetensors`` with the full tensors under their module names (fp32 masters for
the sharded engines; frozen tensors are never checkpointed), plus ``OUT/consolidated.json``
saying where they came from. One CPU process, one network in memory at a time
(flashdmd.engine.checkpoint_reader). For DeepSpeed's own tools on ZeRO-3 step directories see
README ("DeepSpeed's tools").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flashdmd.engine.checkpoint_reader import HANDOFF_META, CheckpointReader
from flashdmd.engine.state_io import load_json, save_json, save_tensors
from flashdmd.train.checkpoint import MARKER, is_valid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def consolidate(step_dir: Path | str, out_dir: Path | str, networks: list[str] | None = None,
                dtype: str = "") -> list[Path]:
    """Write the full weights of ``networks`` (default: all) of ``step_dir`` to ``out_dir``; returns the files."""
    src, out = Path(step_dir), Path(out_dir)
    if not (src / HANDOFF_META).is_file() and not is_valid(src):
        raise FileNotFoundError(f"{src} is neither a complete step directory (no valid {MARKER} marker) "
                                f"nor a hand-over folder ({HANDOFF_META})")
    reader = CheckpointReader(src)
    names = networks or reader.networks()
    unknown = sorted(set(names) - set(reader.networks()))
    if unknown:
        raise KeyError(f"{src} has no network(s) {unknown}; it has {reader.networks()}")
    written = []
    for name in names:
        path = out / f"{name}.safetensors"
        save_tensors(path, reader.state_dict(name, DTYPES[dtype] if dtype else None))
        written.append(path)
    meta = load_json(src / HANDOFF_META) if (src / HANDOFF_META).is_file() else load_json(src / MARKER)
    save_json(out / "consolidated.json", {
        "source": str(src.resolve()), "step": meta.get("step"), "networks": names, "dtype": dtype or "as saved",
        "engines": {n: reader.map(n)["engine"] for n in names},
        "world_size": {n: reader.map(n)["world_size"] for n in names}})
    return written


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashdmd.apps.consolidate",
                                     description="Full weights of a checkpoint step directory as plain safetensors.")
    parser.add_argument("step_dir", help="a checkpoint step directory (any engine, any world size) or a final/ folder")
    parser.add_argument("out", help="output folder: <network>.safetensors per network")
    parser.add_argument("--network", action="append", default=[], help="only this network (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="", help="cast floating tensors (default: as saved)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        files = consolidate(args.step_dir, args.out, args.network or None, args.dtype)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"consolidate error: {err}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
