"""Deterministic toy captioned images: one coloured shape on a coloured background per image.

``python data_tools/make_toy_images.py OUT_DIR --count 200 --size 64`` writes ``000000.png`` +
``000000.txt`` ("a red circle on a blue background") pairs, the folder layout make_shards.py reads.
The caption names exactly what is drawn, so a text-conditioned toy model has something to learn;
the same seed gives the same images byte for byte. ``--aspect`` varies the width/height ratio to
exercise the resize + center crop of the loaders.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def toy_image(index: int, size: int = 64, seed: int = 0, aspect: float = 1.0) -> tuple[Image.Image, str]:
    """Image ``index`` of the toy set and its caption; ``aspect`` > 1 allows widths up to size * aspect."""
    rng = random.Random(f"toy:{seed}:{index}")
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(sorted(COLOURS), 2)
    w = size if aspect == 1.0 else rng.randint(size, int(size * aspect))
    h = size
    image = Image.new("RGB", (w, h), COLOURS[bg])
    r = rng.randint(h // 6, h // 3)
    cx, cy = w // 2 + rng.randint(-w // 8, w // 8), h // 2 + rng.randint(-h // 8, h // 8)
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return image, f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def make_toy_images(out: Path, count: int, size: int = 64, seed: int = 0, aspect: float = 1.0) -> list[Path]:
    """Write ``count`` png + txt pairs into ``out``; return the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, caption = toy_image(i, size, seed, aspect)
        path = out / f"{i:06d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image height (and width unless --aspect)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aspect", type=float, default=1.0, help="max width/height ratio (>= 1)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 8 or args.aspect < 1:
        parser.error("--count must be >= 1, --size >= 8 and --aspect >= 1")
    paths = make_toy_images(args.out, args.count, args.size, args.seed, args.aspect)
    print(f"wrote {len(paths)} images with captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
