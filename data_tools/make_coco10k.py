"""The COCO-10k evaluation set (spec 4.4, 5; DMD2's protocol): a fixed, seeded draw of 10k COCO
images with one caption each -> the prompt list the eval job generates from, and the list of the
same images for FID's reference statistics.

    python data_tools/make_coco10k.py captions_val2014.json OUT_DIR [--images /data/coco/val2014]
           [--num 10000] [--seed 10]

From a COCO captions annotation file (2014 or 2017: ``images[]`` with ``id``/``file_name``,
``annotations[]`` with ``image_id``/``caption``) it draws ``--num`` distinct images with
``random.Random(seed)`` from the images sorted by id, and for each the caption of lowest annotation
id (so the set depends only on the file and the seed). OUT_DIR gets ``prompts.txt`` (one caption a
line, whitespace collapsed; ``eval.prompts``), ``reference.txt`` (the images, one path a line, under
``--images`` when given, else COCO's file names; ``eval.reference_images``) and ``coco10k.jsonl``
(image id, file name, caption per line, in the same order).

Departure: DMD2 ships its own pickled 10k prompt list (``all_prompts.pkl``, not read here, as it is a
pickle); this draw is reproducible but not the same 10k. Seed 10 is DMD2's evaluation seed [INF].
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def coco_pairs(annotations: dict) -> list[tuple[int, str, str]]:
    """(image id, file name, caption) for every image with a caption, sorted by image id."""
    files = {image["id"]: image["file_name"] for image in annotations["images"]}
    first: dict[int, tuple[int, str]] = {}
    for ann in annotations["annotations"]:
        caption = " ".join(str(ann["caption"]).split())
        if caption and (ann["image_id"] not in first or ann["id"] < first[ann["image_id"]][0]):
            first[ann["image_id"]] = (ann["id"], caption)
    return [(image_id, files[image_id], first[image_id][1]) for image_id in sorted(first) if image_id in files]


def make_coco10k(
    captions: Path, out: Path, images: Path | None = None, num: int = 10000, seed: int = 10
) -> list[tuple[int, str, str]]:
    """Write prompts.txt, reference.txt and coco10k.jsonl under ``out``; returns the drawn pairs."""
    annotations = json.loads(captions.read_text())
    if not {"images", "annotations"} <= set(annotations):
        raise ValueError(f"{captions} is not a COCO captions file (needs 'images' and 'annotations')")
    pairs = coco_pairs(annotations)
    if num > len(pairs):
        raise ValueError(f"--num {num} is more than the {len(pairs)} captioned images of {captions}")
    drawn = random.Random(seed).sample(pairs, num)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("".join(f"{caption}\n" for _, _, caption in drawn))
    base = images.resolve() if images else None
    (out / "reference.txt").write_text("".join(f"{base / name if base else name}\n" for _, name, _ in drawn))
    (out / "coco10k.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "file_name": name, "caption": caption}) + "\n" for i, name, caption in drawn)
    )
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captions", type=Path, help="captions_val2014.json or captions_val2017.json")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--images", type=Path, help="the COCO image folder (val2014/); paths in reference.txt")
    parser.add_argument("--num", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=10, help="DMD2's evaluation seed (spec 6 #21)")
    args = parser.parse_args(argv)
    try:
        drawn = make_coco10k(args.captions, args.out, args.images, args.num, args.seed)
    except (ValueError, KeyError, OSError) as err:
        print(f"make_coco10k: {err}", file=sys.stderr)
        return 1
    print(
        f"{len(drawn)} prompts -> {args.out / 'prompts.txt'} (eval.prompts), "
        f"images -> {args.out / 'reference.txt'} (eval.reference_images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
