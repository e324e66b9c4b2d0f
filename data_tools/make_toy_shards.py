"""Toy captioned image shards in one step (the tiny presets' and the tests' data).

    python data_tools/make_toy_shards.py OUT_DIR --count 256 --per-shard 32 --size 64

Same images and captions as make_toy_images.py (coloured shapes, "a red circle on a blue
background"), written straight into shards by make_shards.write_shards, keys ``00000000``...
"""
from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.make_shards import write_shards  # noqa: E402
from data_tools.make_toy_images import toy_image  # noqa: E402


def toy_samples(count: int, size: int = 64, seed: int = 0, aspect: float = 1.0, start: int = 0) -> Iterator[dict[str, Any]]:
    """Shard samples (png + txt + json) ``start .. start + count - 1`` of the toy set."""
    for i in range(start, start + count):
        image, caption = toy_image(i, size, seed, aspect)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        meta = {"width": image.width, "height": image.height, "source": f"toy:{seed}:{i}", "caption": caption}
        yield {"__key__": f"{i:08d}", "png": buffer.getvalue(), "txt": caption, "json": meta}


def make_toy_shards(out: Path, count: int, per_shard: int, size: int = 64, seed: int = 0, aspect: float = 1.0,
                    prefix: str = "toy", start: int = 0) -> list[str]:
    """Write toy samples ``start .. start + count - 1``, ``per_shard`` per shard; return the shard paths."""
    return write_shards(toy_samples(count, size, seed, aspect, start), out, prefix, maxcount=per_shard)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aspect", type=float, default=1.0)
    parser.add_argument("--prefix", default="toy")
    args = parser.parse_args(argv)
    if args.count < 1 or args.per_shard < 1 or args.size < 8 or args.aspect < 1:
        parser.error("--count and --per-shard must be >= 1, --size >= 8, --aspect >= 1")
    shards = make_toy_shards(args.out, args.count, args.per_shard, args.size, args.seed, args.aspect, args.prefix)
    print(f"wrote {len(shards)} shards ({args.count} samples) to {args.out}: {args.prefix}-{{000000..{len(shards) - 1:06d}}}.tar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
