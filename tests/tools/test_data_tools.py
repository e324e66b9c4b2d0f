"""Each data_tools script end to end, as a subprocess, on a folder of generated images; the shards
they write are read back by the training loaders."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.encode_latents import main as encode_latents_main
from data_tools.make_prompts import make_prompts
from flashdmd.config import load_config
from flashdmd.data import build_image_loader, load_prompts
from flashdmd.data.decode import decode_image
from flashdmd.data.shards import RawSample

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str, *args: object) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "data_tools" / f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    out = _tool("make_toy_images", folder, "--count", 12, "--size", 16, "--aspect", 1.5)
    assert "wrote 12 images" in out
    return folder


def _loader_keys_and_captions(pattern: str, batches: int, *overrides: str):
    cfg = load_config("tiny-sdxl", [f"data.shards={pattern}", "data.resolution=16", "data.batch_size=2",
                                    f"data.epoch_length={batches}", "data.shuffle_buffer=0", "data.resampled=false",
                                    *overrides])
    loader = build_image_loader(cfg, 0, 1)
    return [b for b in loader], loader


def test_make_toy_images_is_deterministic_and_captions_describe_the_image(images, tmp_path):
    _tool("make_toy_images", tmp_path, "--count", 12, "--size", 16, "--aspect", 1.5)
    for path in sorted(images.glob("*.png")):
        assert path.read_bytes() == (tmp_path / path.name).read_bytes()
    caption = (images / "000000.txt").read_text().strip()
    assert caption.startswith(("a ", "an ")) and caption.endswith(" background")


def test_make_shards_from_folder_and_manifest(images, tmp_path):
    (images / "broken.png").write_bytes(b"not a png")
    (images / "broken.txt").write_text("a broken image")
    (images / "nocaption.png").write_bytes((images / "000000.png").read_bytes())
    try:
        out = _tool("make_shards", images, tmp_path / "folder", "--maxcount", 5, "--workers", 2, "--no-progress")
    finally:
        for name in ("broken.png", "broken.txt", "nocaption.png"):
            (images / name).unlink()
    assert "wrote 3 shards" in out and "'corrupt_image': 1" in out and "'missing_caption': 1" in out
    batches, loader = _loader_keys_and_captions(str(tmp_path / "folder"), 6)
    captions = {(images / f"{i:06d}.txt").read_text().strip() for i in range(12)}
    assert {c for b in batches for c in b["caption"]} == captions
    assert loader.bad_counts() == {}

    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for i in range(12):
            writer.writerow([str(images / f"{i:06d}.png"), f"manifest caption {i}"])
    _tool("make_shards", manifest, tmp_path / "csv", "--prefix", "m", "--maxsize", 1000, "--no-progress")
    assert len(list((tmp_path / "csv").glob("m-*.tar"))) > 2  # rolled over by payload size, not count
    batches, _ = _loader_keys_and_captions(str(tmp_path / "csv"), 6, "data.resampled=true")
    assert all(c.startswith("manifest caption") for b in batches for c in b["caption"])


def test_make_toy_shards_are_read_by_the_loader(tmp_path):
    out = _tool("make_toy_shards", tmp_path, "--count", 10, "--per-shard", 4, "--size", 16)
    assert "toy-{000000..000002}.tar" in out
    batches, _ = _loader_keys_and_captions(str(tmp_path / "toy-{000000..000002}.tar"), 5)
    assert sorted(k for b in batches for k in b["key"]) == [f"{i:08d}" for i in range(10)]


def _tiny_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4), norm_num_groups=2, latent_channels=4, layers_per_block=1,
        sample_size=16, mid_block_add_attention=False, scaling_factor=0.5, shift_factor=0.1,
    )
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.slow
def test_encode_latents_on_two_ranks_matches_the_vae(images, tmp_path):
    _tool("make_shards", images, tmp_path / "img", "--maxcount", 4, "--no-progress")
    vae = _tiny_vae(tmp_path / "vae")
    common = [str(tmp_path / "img"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae"), "--resolution", "16",
              "--batch-size", "3", "--format", "safetensors"]
    # rank 0 end to end as its own process (rank from the environment, as under srun/torchrun) ...
    rank0 = subprocess.run([sys.executable, str(REPO / "data_tools" / "encode_latents.py"), *common],
                           env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=300)
    assert rank0.returncode == 0 and "rank 0/2" in rank0.stdout, rank0.stderr
    # ... rank 1 in this process (diffusers is imported already: one interpreter start less on a 2-core box)
    assert encode_latents_main([*common, "--rank", "1", "--world-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.tar")) == sorted(p.name for p in (tmp_path / "img").glob("*.tar"))
    batches, loader = _loader_keys_and_captions(str(tmp_path / "lat"), 6, "data.latent_shards=true", "data.latent_shape=[4,2,2]")
    assert loader.bad_counts() == {}
    with torch.no_grad():
        for batch in batches:
            pixels = torch.stack([decode_image(RawSample(k, "", {"png": (images / f"{int(k):06d}.png").read_bytes()}), 16)
                                  for k in batch["key"]])
            reference = (vae.encode(pixels).latent_dist.mean - 0.1) * 0.5
            assert torch.allclose(batch["latent"], reference, atol=1e-5)
    meta = json.loads(subprocess.run(["tar", "-xOf", str(tmp_path / "lat" / "shard-000000.tar"), "00000000.json"],
                                     capture_output=True, check=True).stdout)
    assert meta["scaling_factor"] == 0.5 and meta["shift_factor"] == 0.1 and meta["latent_shape"] == [4, 2, 2]
    assert meta["vae"] == str((tmp_path / "vae").resolve())


def test_make_prompts_dedupes_subsamples_and_writes_all_formats(images, tmp_path):
    coco = tmp_path / "captions.json"
    captions = [(images / f"{i:06d}.txt").read_text().strip() for i in range(12)]
    annotations = [{"image_id": i, "caption": c} for i, c in enumerate(captions + [c.upper() + "  " for c in captions[:4]])]
    coco.write_text(json.dumps({"annotations": annotations}))
    distinct = list(dict.fromkeys(c.lower() for c in captions))
    _tool("make_prompts", coco, tmp_path / "all.txt")
    assert [p.lower() for p in load_prompts(str(tmp_path / "all.txt"))] == distinct
    _tool("make_prompts", coco, tmp_path / "five.jsonl", "--num", 5, "--seed", 10)
    five = load_prompts(str(tmp_path / "five.jsonl"))
    assert len(five) == 5 and len(set(five)) == 5 and set(p.lower() for p in five) <= set(distinct)
    assert make_prompts(str(coco), tmp_path / "again.txt", num=5, seed=10) == five  # the same draw in-process
    assert make_prompts(str(coco), tmp_path / "other.txt", num=5, seed=11) != five
    _tool("make_prompts", images, tmp_path / "shards", "--per-shard", 4)
    assert [p.lower() for p in load_prompts(str(tmp_path / "shards"))] == distinct


def test_inspect_shards_reports_counts_coverage_bad_samples_and_a_sheet(images, tmp_path):
    _tool("make_shards", images, tmp_path / "img", "--maxcount", 5, "--no-progress")
    broken = tmp_path / "img" / "shard-000001.tar"
    data = bytearray(broken.read_bytes())
    cut = len(data) // 2
    (tmp_path / "img" / "cut.tar").write_bytes(bytes(data[:cut]))
    out = _tool("inspect_shards", tmp_path / "img", "--resolution", 16, "--sheet", tmp_path / "sheet.png",
                "--sheet-count", 6, "--json", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shards"] == 4 and summary["per_shard"][str(tmp_path / "img" / "shard-000000.tar")] == 5
    assert summary["coverage"] == {"json": 1.0, "png": 1.0, "txt": 1.0}
    assert summary["bad_counts"] == {"truncated_tar": 1}
    assert summary["bad"][0]["shard"] == str(tmp_path / "img" / "cut.tar")
    assert "truncated_tar" in out and "contact sheet of 6 samples" in out
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (4 * 96, 2 * (96 + 24))
    strict = subprocess.run([sys.executable, str(REPO / "data_tools" / "inspect_shards.py"), tmp_path / "img", "--strict",
                             "--resolution", "16"], capture_output=True)
    assert strict.returncode == 1
