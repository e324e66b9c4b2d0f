"""The shard pipeline on real tar files: rank x worker split, equal batch counts, plain-tar shards,
pixels of the resize + center crop, and the latent pipeline that never decodes an image."""
from __future__ import annotations

import io
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from data_tools.make_shards import write_shards
from data_tools.make_toy_shards import make_toy_shards
from flashdmd.config import load_config
from flashdmd.data import DataError, build_image_loader, check_shards


def _cfg(shards: str, *overrides: str):
    return load_config("tiny-sdxl", [f"data.shards={shards}", "data.resolution=16", "data.batch_size=2", *overrides])


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    """8 shards x 5 samples of 16px toy images: 40 keys 00000000..00000039."""
    out = tmp_path_factory.mktemp("toy")
    make_toy_shards(out, count=40, per_shard=5, size=16)
    return str(out / "toy-{000000..000007}.tar")


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_cover_one_pass_disjointly_with_equal_counts(toy, workers):
    # 4 (rank, worker) parts x 2 shards x 5 samples: one epoch of 10 batches per rank is one exact pass
    cfg = _cfg(toy, "data.resampled=false", f"data.workers={workers}", "data.epoch_length=10", "data.shuffle_buffer=0")
    per_rank = []
    for rank in range(2):
        loader = build_image_loader(cfg, rank, 2)
        batches = list(loader)
        assert len(batches) == 10 and all(len(b["key"]) == 2 and b["image"].shape == (2, 3, 16, 16) for b in batches)
        per_rank.append([k for b in batches for k in b["key"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:08d}" for i in range(40)]
    assert all(len(set(keys)) == 20 for keys in per_rank)


def test_two_ranks_two_workers_disjoint_with_a_shuffle_buffer(toy):
    cfg = _cfg(toy, "data.resampled=false", "data.workers=2", "data.epoch_length=4", "data.shuffle_buffer=3")
    a, b = (_keys(build_image_loader(cfg, rank, 2)) for rank in range(2))
    assert len(a) == len(b) == 8 and len(set(a) | set(b)) == 16
    # the buffer reorders within a worker's shards: not the plain shard order
    plain = _cfg(toy, "data.resampled=false", "data.workers=2", "data.epoch_length=4", "data.shuffle_buffer=0")
    assert a != _keys(build_image_loader(plain, 0, 2))


def test_shard_globs_expand_sorted_like_the_brace_form(toy, tmp_path):
    folder = toy.rsplit("/", 1)[0]
    braces = check_shards(_cfg(toy))
    # a shell-style glob, and one mixed with a brace range: the same shards in the same (sorted) order
    assert check_shards(_cfg(f"{folder}/*.tar")) == braces
    assert check_shards(_cfg(f"{folder}/toy-00000[4-7].tar::{folder}/toy-{{000000..000003}}.tar")) == braces[4:] + braces[:4]
    cfg = _cfg(f"{folder}/toy-*.tar", "data.resampled=false", "data.epoch_length=20", "data.shuffle_buffer=0")
    assert sorted(_keys(build_image_loader(cfg, 0, 1))) == [f"{i:08d}" for i in range(40)]
    with pytest.raises(DataError, match="a glob that matches nothing") as err:
        check_shards(_cfg(str(tmp_path / "*.tar")))
    assert str(tmp_path / "*.tar") in str(err.value)


def test_resampled_ranks_get_equal_batches_from_uneven_shards(tmp_path):
    # three shards of 1, 3 and 11 samples: a split by shard would leave ranks with unequal data (webdataset #225)
    for i, n in enumerate([1, 3, 11]):
        make_toy_shards(tmp_path, count=n, per_shard=n, size=16, seed=i, prefix=f"uneven{i}")
    pattern = str(tmp_path / "uneven{0,1,2}-000000.tar")
    cfg = _cfg(pattern, "data.resampled=true", "data.workers=2", "data.epoch_length=7", "data.shuffle_buffer=4")
    counts = [sum(1 for _ in build_image_loader(cfg, rank, 2)) for rank in range(2)]
    assert counts == [7, 7]


def test_shards_written_by_plain_tar_are_read(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    colours = {"a001": (255, 0, 0), "a002": (0, 0, 255), "a003": (0, 255, 0), "a004": (255, 255, 0)}
    for key, colour in colours.items():
        Image.new("RGB", (20, 20), colour).save(folder / f"{key}.jpg", quality=95)
        (folder / f"{key}.txt").write_text(f"caption of {key}")
    shard = tmp_path / "plain.tar"
    # GNU tar in name order (members ./a001.jpg, ./a001.txt, ...): the documented way to make a shard by hand
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(folder), "."], check=True)
    assert any(name.startswith("./") for name in tarfile.open(shard).getnames())
    cfg = _cfg(str(shard), "data.resampled=true", "data.epoch_length=2", "data.shuffle_buffer=0")
    batches = list(build_image_loader(cfg, 0, 1))
    for batch in batches:
        for key, caption, image in zip(batch["key"], batch["caption"], batch["image"]):
            assert caption == f"caption of {key}"
            expected = torch.tensor(colours[key], dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.03)  # jpeg keeps flat colours


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_resize_and_center_crop_pixels(tmp_path):
    # 32x16 wide image: red left and right quarters, a 16x16 gradient in the middle
    wide = np.zeros((16, 32, 3), dtype=np.uint8)
    wide[:, :, 0] = 255
    cols, rows = np.meshgrid(np.arange(16) * 16, np.arange(16) * 8, indexing="xy")
    wide[:, 8:24] = np.stack([cols, rows, np.full((16, 16), 7)], -1)
    tall = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), dtype=np.uint8))
    samples = [
        {"__key__": "wide", "png": _png(Image.fromarray(wide)), "txt": "wide"},
        {"__key__": "tall", "png": _png(tall), "txt": "tall"},
    ]
    write_shards(samples, tmp_path, "px")
    cfg = _cfg(str(tmp_path / "px-000000.tar"), "data.resampled=false", "data.epoch_length=1", "data.shuffle_buffer=0")
    batch = next(iter(build_image_loader(cfg, 0, 1)))
    images = dict(zip(batch["key"], batch["image"]))
    # no resize needed (short side 16 == R): the crop is exactly the middle square
    assert torch.equal(images["wide"], torch.from_numpy(wide[:, 8:24].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
    # 24x40 -> 16x27 (bicubic), then rows 5..21
    ref = np.asarray(tall.resize((16, 27), Image.Resampling.BICUBIC), dtype=np.float32)[5:21]
    assert torch.allclose(images["tall"], torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_latent_pipeline_reads_latents_and_never_decodes_images(tmp_path, fmt):
    rng = np.random.default_rng(0)
    latents = {f"k{i:03d}": rng.standard_normal((4, 2, 2)).astype(np.float32) for i in range(6)}
    samples = []
    for key, latent in latents.items():
        if fmt == "npy":
            buffer = io.BytesIO()
            np.save(buffer, latent)
            stored = {"latent.npy": buffer.getvalue()}
        else:
            stored = {"latent.safetensors": save_safetensors({"latent": torch.from_numpy(latent)})}
        # the jpg member is garbage: decoding it would count corrupt_image
        samples.append({"__key__": key, "jpg": b"not an image", "txt": f"caption {key}", **stored})
    write_shards(samples, tmp_path, "lat")
    cfg = _cfg(str(tmp_path / "lat-000000.tar"), "data.latent_shards=true", "data.epoch_length=3", "data.shuffle_buffer=0",
               "data.resampled=false")
    loader = build_image_loader(cfg, 0, 1)
    batches = list(loader)
    assert len(batches) == 3 and all("image" not in b for b in batches)
    for batch in batches:
        assert batch["latent"].shape == (2, 4, 2, 2)
        for key, caption, latent in zip(batch["key"], batch["caption"], batch["latent"]):
            assert caption == f"caption {key}"
            assert torch.equal(latent, torch.from_numpy(latents[key]))
    assert sorted(k for b in batches for k in b["key"]) == sorted(latents)
    assert loader.bad_counts() == {}


def test_gzipped_and_pipe_shards(tmp_path, toy):
    first = toy.replace("{000000..000007}", "000000")
    gz = tmp_path / "toy.tar.gz"
    subprocess.run(f"gzip -c {first} > {gz}", shell=True, check=True)
    for pattern in (str(gz), f"pipe:cat {first}"):
        cfg = _cfg(pattern, "data.resampled=false", "data.epoch_length=2", "data.shuffle_buffer=0")
        assert _keys(build_image_loader(cfg, 0, 1)) == [f"{i:08d}" for i in range(4)]
