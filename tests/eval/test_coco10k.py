"""data_tools/make_coco10k.py on a small COCO-style captions file: a seeded draw of distinct images,
one caption each (the lowest annotation id), prompts and reference images in the same order, the
same files for the same seed, and a reference list the FID metric reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_tools.make_coco10k import main, make_coco10k
from flashdmd.data.prompts import load_prompts
from flashdmd.eval.fid import reference_files


def coco_file(tmp_path, n: int = 30):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(n)]
    annotations = [
        {"id": 1000 + 2 * i + k, "image_id": 100 + i, "caption": f" caption {k} of  image {i} "}
        for i in range(n)
        for k in (1, 0)
    ]  # the lower id is written second
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    folder = tmp_path / "val2014"
    folder.mkdir()
    for image in images:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / image["file_name"])
    return path, folder


def test_coco10k_is_a_fixed_seeded_draw_with_its_reference_images(tmp_path):
    captions, folder = coco_file(tmp_path)
    drawn = make_coco10k(captions, tmp_path / "a", folder, num=12, seed=10)
    assert len({image_id for image_id, _, _ in drawn}) == 12
    prompts = load_prompts(str(tmp_path / "a" / "prompts.txt"))
    refs = reference_files(tmp_path / "a" / "reference.txt")
    assert len(prompts) == len(refs) == 12
    for prompt, ref in zip(prompts, refs):  # the k=0 caption (lowest annotation id), whitespace collapsed
        i = int(ref.stem.rsplit("_", 1)[1]) - 100
        assert prompt == f"caption 0 of image {i}" and ref.parent == folder.resolve()
    assert main([str(captions), str(tmp_path / "b"), "--images", str(folder), "--num", "12"]) == 0
    for name in ("prompts.txt", "reference.txt", "coco10k.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert make_coco10k(captions, tmp_path / "c", folder, num=12, seed=11) != drawn
    with pytest.raises(ValueError, match="more than the 30 captioned images"):
        make_coco10k(captions, tmp_path / "d", num=31)
