"""Bad input on real tar files: each case is skipped, counted per reason and logged with key and
shard; the abort threshold fires with a clear error; empty shard lists fail before training."""
from __future__ import annotations

import io
import logging
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.make_shards import write_shards
from data_tools.make_toy_shards import make_toy_shards, toy_samples
from flashdmd.config import load_config
from flashdmd.data import DataError, build_image_loader, check_shards

GOOD = 6  # good samples in the reference shard


def _cfg(shards: str, *overrides: str):
    return load_config(
        "tiny-sdxl",
        [f"data.shards={shards}", "data.resolution=16", "data.batch_size=2", "data.shuffle_buffer=0",
         "data.resampled=false", "data.max_bad_fraction=0.9", "data.bad_check_after=1000", *overrides],
    )


@pytest.fixture()
def good(tmp_path) -> str:
    return make_toy_shards(tmp_path / "good", count=GOOD, per_shard=GOOD, size=16, prefix="good")[0]


def _run(pattern: str, batches: int, *overrides: str):
    loader = build_image_loader(_cfg(pattern, f"data.epoch_length={batches}", *overrides), 0, 1)
    keys = [k for batch in loader for k in batch["key"]]
    return loader, keys


def _one_bad_shard(tmp_path: Path, samples: list[dict]) -> str:
    return write_shards(samples, tmp_path / "bad", "bad")[0]


def _npy(shape) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=np.float32))
    return buffer.getvalue()


def _toy(key: str) -> dict:
    sample = next(toy_samples(1, size=16))
    sample["__key__"] = key
    return sample


def _expect(caplog, loader, keys, reason: str, bad_key: str, shard: str, count: int = 1):
    assert loader.bad_counts() == {reason: count}
    assert bad_key not in keys
    logged = [r.getMessage() for r in caplog.records if f"({reason})" in r.getMessage()]
    assert logged and f"key={bad_key}" in logged[0] and f"shard={shard}" in logged[0]


def test_corrupt_image_missing_image_and_missing_caption_are_skipped(tmp_path, good, caplog):
    cases = {
        "corrupt_image": {**_toy("bad1"), "png": b"\x89PNG\r\n\x1a\n truncated"},
        "missing_image": {k: v for k, v in _toy("bad1").items() if k != "png"},
        "missing_caption": {**{k: v for k, v in _toy("bad1").items() if k not in ("txt", "json")}, "json": {"width": 16}},
    }
    for reason, sample in cases.items():
        caplog.clear()
        folder = tmp_path / reason
        shard = write_shards([_toy("ok1"), sample, _toy("ok2"), _toy("ok3")], folder, "bad")[0]
        with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
            loader, keys = _run(shard, 3)  # 6 samples: two passes over the three good ones
        assert sorted(keys) == ["ok1", "ok1", "ok2", "ok2", "ok3", "ok3"]
        _expect(caplog, loader, keys, reason, "bad1", shard, count=1)  # met in both passes, counted once


def test_empty_caption_counts_as_missing(tmp_path, caplog):
    shard = _one_bad_shard(tmp_path, [_toy("ok1"), {**_toy("bad1"), "txt": "   "}, _toy("ok2")])
    with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
        loader, keys = _run(shard, 1)
    _expect(caplog, loader, keys, "missing_caption", "bad1", shard)


@pytest.mark.parametrize("where", ["inside a member", "at a block boundary"])
def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, good, caplog, where):
    whole = Path(good).read_bytes()
    cut_member = tarfile.open(good).getmembers()[3 * 3 + 1]  # the 2nd member of sample 3 (png)
    # a cut between two members is invisible to tarfile, which stops there as if the tar had ended
    cut = cut_member.offset_data + cut_member.size // 2 if where == "inside a member" else cut_member.offset
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole[:cut])
    with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
        loader, keys = _run(str(truncated), 3)
    assert keys == ["00000000", "00000001", "00000002"] * 2
    # the loader stops after the 6th good sample, before reading the cut a second time
    _expect(caplog, loader, keys, "truncated_tar", "00000003", str(truncated), count=1)


def test_unreadable_shard_urls_are_skipped(tmp_path, good, caplog):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    for url in (str(tmp_path / "missing.tar"), str(garbage), "pipe:exit 3"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
            loader, keys = _run(f"{good}::{url}", GOOD)  # two passes: the bad URL is read in at least one
        assert sorted(keys) == sorted([f"{i:08d}" for i in range(GOOD)] * 2)
        assert set(loader.bad_counts()) == {"unreadable_shard"} and loader.bad_counts()["unreadable_shard"] >= 1
        assert any(f"shard={url}" in r.getMessage() for r in caplog.records)


def test_ungrouped_plain_tar_is_reported(tmp_path, caplog):
    folder = tmp_path / "files"
    folder.mkdir()
    for sample in (_toy("a"), _toy("b"), _toy("g")):
        (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
        (folder / f"{sample['__key__']}.txt").write_text(sample["txt"])
    shard = tmp_path / "interleaved.tar"
    order = ["g.png", "g.txt", "a.png", "b.png", "a.txt", "b.txt"]  # a plain `tar` in directory order
    subprocess.run(["tar", "-cf", str(shard), "-C", str(folder), *order], check=True)
    with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
        loader, keys = _run(str(shard), 1)
    assert keys == ["g", "g"]
    assert loader.bad_counts() == {"missing_caption": 2, "ungrouped_tar": 1}
    assert any("--sort=name" in r.getMessage() and "key=a" in r.getMessage() for r in caplog.records)


def test_wrong_latent_shape_and_corrupt_latent(tmp_path, caplog):
    samples = [{"__key__": f"k{i}", "txt": f"c{i}", "latent.npy": _npy((4, 2, 2))} for i in range(4)]
    samples.insert(1, {"__key__": "wide", "txt": "c", "latent.npy": _npy((4, 2, 3))})
    samples.insert(3, {"__key__": "chan", "txt": "c", "latent.npy": _npy((3, 2, 2))})
    samples.insert(4, {"__key__": "junk", "txt": "c", "latent.npy": b"\x93NUMPY garbage"})
    shard = _one_bad_shard(tmp_path, samples)
    with caplog.at_level(logging.WARNING, logger="flashdmd.data"):
        loader, keys = _run(shard, 2, "data.latent_shards=true", "data.latent_shape=[4,2,2]")
    assert keys == ["k0", "k1", "k2", "k3"]
    assert loader.bad_counts() == {"wrong_latent_shape": 2, "corrupt_latent": 1}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "key=wide" in messages and "key=chan" in messages and "key=junk" in messages


def _half_bad(tmp_path) -> str:
    samples = []
    for i in range(10):
        samples.append(_toy(f"ok{i}") if i % 2 else {**_toy(f"bad{i}"), "png": b"broken"})
    return _one_bad_shard(tmp_path, samples)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_fraction_above_the_threshold_aborts_naming_reason_and_shard(tmp_path, workers):
    shard = _half_bad(tmp_path)
    pattern = shard if workers == 0 else f"{shard}::{shard}"  # deterministic mode needs a shard per worker
    with pytest.raises(DataError) as err:
        _run(pattern, 5, "data.max_bad_fraction=0.3", "data.bad_check_after=8", f"data.workers={workers}")
    message = str(err.value)
    assert "corrupt_image" in message and shard in message and "data.max_bad_fraction=0.3" in message


def test_bad_fraction_below_the_threshold_does_not_abort(tmp_path):
    loader, keys = _run(_half_bad(tmp_path), 5, "data.max_bad_fraction=0.6", "data.bad_check_after=8")
    assert len(keys) == 10 and loader.bad_counts() == {"corrupt_image": 5}  # 5 broken samples, met twice each
    assert loader.position.seen == 15


def test_nothing_readable_aborts_even_at_threshold_one(tmp_path):
    with pytest.raises(DataError, match="not one good item.*unreadable_shard"):
        _run(str(tmp_path / "gone-{0..3}.tar") + "::pipe:exit 1", 1, "data.max_bad_fraction=1.0", "data.bad_check_after=5")


def test_empty_or_missing_shard_lists_fail_before_training(tmp_path):
    cfg = _cfg("")
    with pytest.raises(DataError, match="data.shards is empty"):
        check_shards(cfg)
    pattern = str(tmp_path / "nothing-{000000..000009}.tar")
    with pytest.raises(DataError, match="none of its 10 shard files exist") as err:
        build_image_loader(_cfg(pattern), 0, 1)
    assert pattern in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="matches no shard"):
        check_shards(_cfg(str(tmp_path / "empty")))


def test_deterministic_mode_needs_a_shard_per_rank_and_worker(good):
    with pytest.raises(DataError, match="fewer than world_size x data.workers = 2 x 2"):
        build_image_loader(_cfg(good, "data.workers=2"), 0, 2)


def test_bad_counts_survive_a_resume(tmp_path):
    cfg = _cfg(_half_bad(tmp_path), "data.epoch_length=2", "data.max_bad_fraction=0.6", "data.bad_check_after=8")
    loader = build_image_loader(cfg, 0, 1)
    list(loader)
    before = loader.bad_counts()
    assert before["corrupt_image"] >= 4
    resumed = build_image_loader(cfg, 0, 1, loader.position)
    list(resumed)
    # the resumed stream fast-forwards over what was counted already, then counts its own
    assert resumed.bad_counts()["corrupt_image"] > before["corrupt_image"]
    assert resumed.position.seen == resumed.position.samples + resumed.bad_counts()["corrupt_image"]
