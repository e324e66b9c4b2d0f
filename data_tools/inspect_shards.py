"""Check shards before training: sample counts, key coverage, bad samples, a contact sheet.

    python data_tools/inspect_shards.py PATTERN [--resolution 64] [--latent] [--sheet sheet.png]
           [--sheet-count 16] [--json summary.json] [--strict]

Every sample is decoded exactly as the loaders decode it (flashdmd.data.decode), so a sample
reported bad here is one the training run would skip. Prints per-shard counts, for each member
extension the fraction of samples that have it, and every bad sample with its reason, key and
shard. The totals add up: samples read = good + bad samples; shard-level problems (unreadable
shard, truncated or ungrouped tar) are counted apart, as they are no sample of their own; ``--json`` writes the same as a file; ``--sheet`` draws the first images (or, for latent
shards, the first three latent channels as RGB) with their captions. ``--strict`` exits 1 when
any sample is bad.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashdmd.data.bad_samples import SHARD_REASONS, BadSamples  # noqa: E402
from flashdmd.data.decode import BadSample, decode_caption, decode_image, decode_latent  # noqa: E402
from flashdmd.data.shards import expand_shards, read_shard  # noqa: E402

THUMB = 96


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    """[3, H, W] in about [-1, 1] (or the first 3 latent channels, min-max scaled) -> RGB image."""
    x = tensor[:3].float()
    if x.shape[0] < 3:
        x = x[:1].expand(3, -1, -1)
    if x.min() < -1.01 or x.max() > 1.01:
        x = (x - x.min()) / (x.max() - x.min() + 1e-8) * 2 - 1
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((THUMB, THUMB), Image.Resampling.NEAREST)


def contact_sheet(items: list[tuple[str, torch.Tensor]], columns: int = 4) -> Image.Image:
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + 24)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, tensor) in enumerate(items):
        x, y = (i % columns) * THUMB, (i // columns) * (THUMB + 24)
        sheet.paste(_to_pil(tensor), (x, y))
        draw.text((x + 2, y + THUMB + 2), caption[:18], fill="black")
        draw.text((x + 2, y + THUMB + 12), caption[18:36], fill="black")
    return sheet


def inspect(pattern: str, resolution: int = 64, latent: bool = False, sheet_count: int = 16) -> tuple[dict[str, Any], list]:
    """Summary dict and the first ``sheet_count`` (caption, tensor) pairs of ``pattern``."""
    urls = expand_shards(pattern)
    events: list[tuple[str, str, str, str]] = []
    bad = BadSamples(check_after=sys.maxsize, events=events)
    per_shard: dict[str, int] = {}
    coverage: Counter = Counter()
    samples = 0
    thumbs: list[tuple[str, torch.Tensor]] = []
    for url in urls:
        per_shard[url] = 0
        for raw in read_shard(url, bad):
            per_shard[url] += 1
            samples += 1
            coverage.update(raw.files.keys())
            try:
                caption = decode_caption(raw)
                tensor = decode_latent(raw, None) if latent else decode_image(raw, resolution)
            except BadSample as err:
                bad.bad(err.reason, raw.key, raw.shard, err.detail)
                continue
            bad.ok()
            if len(thumbs) < sheet_count:
                thumbs.append((caption, tensor))
    bad_samples = sum(n for reason, n in bad.counts.items() if reason not in SHARD_REASONS)
    summary = {
        "pattern": pattern,
        "shards": len(urls),
        "samples": samples,
        "good": bad.good,
        "bad_samples": bad_samples,
        "shard_problems": sum(bad.counts.values()) - bad_samples,
        "per_shard": per_shard,
        "coverage": {ext: round(n / max(samples, 1), 4) for ext, n in sorted(coverage.items())},
        "bad_counts": dict(bad.counts),
        "bad": [{"reason": r, "key": k, "shard": s, "detail": d} for r, k, s, d in events],
    }
    return summary, thumbs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="brace pattern, directory or ::-list of shards")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent", action="store_true", help="latent shards: decode latents, not images")
    parser.add_argument("--sheet", type=Path, default=None, help="write a contact sheet PNG here")
    parser.add_argument("--sheet-count", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any sample is bad")
    args = parser.parse_args(argv)
    summary, thumbs = inspect(args.shards, args.resolution, args.latent, args.sheet_count if args.sheet else 0)
    if not summary["shards"]:
        print(f"error: {args.shards} matches no shard", file=sys.stderr)
        return 2
    print(f"{summary['shards']} shards, {summary['samples']} samples: {summary['good']} good, "
          f"{summary['bad_samples']} bad; {summary['shard_problems']} shard-level problems")
    for url, n in summary["per_shard"].items():
        print(f"  {n:8d}  {url}")
    print("key coverage: " + ", ".join(f"{ext} {frac:.0%}" for ext, frac in summary["coverage"].items()))
    print(f"bad: {summary['bad_counts'] or 'none'}")
    for item in summary["bad"]:
        print(f"  {item['reason']:<20} key={item['key']} shard={item['shard']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.sheet and thumbs:
        contact_sheet(thumbs).save(args.sheet)
        print(f"contact sheet of {len(thumbs)} samples: {args.sheet}")
    return 1 if args.strict and summary["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
