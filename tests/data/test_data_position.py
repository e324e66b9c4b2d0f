"""Save the data position, restart, continue: deterministic mode equals the uninterrupted stream,
resampled mode is a fresh draw, not a replay; the position is plain JSON."""
from __future__ import annotations

import json

import pytest
import torch

from data_tools.make_toy_shards import make_toy_shards
from flashdmd.config import load_config
from flashdmd.data import DataError, DataPosition, build_image_loader


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("toy")
    make_toy_shards(out, count=48, per_shard=6, size=16)
    return str(out / "toy-{000000..000007}.tar")


def _cfg(shards: str, *overrides: str):
    return load_config(
        "tiny-sdxl",
        [f"data.shards={shards}", "data.resolution=16", "data.batch_size=2", "data.epoch_length=5", "data.shuffle_buffer=4",
         *overrides],
    )


def _take(loader, n: int) -> list[dict]:
    """n batches across epoch boundaries, as a trainer loop that re-iterates the loader would see them."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _through_json(position: DataPosition) -> DataPosition:
    return DataPosition.from_state_dict(json.loads(json.dumps(position.state_dict())))


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 3), (2, 6)])
def test_deterministic_resume_equals_the_uninterrupted_stream(toy, workers, stop):
    cfg = _cfg(toy, "data.resampled=false", f"data.workers={workers}")
    rank, world = 1, 2
    reference = _take(build_image_loader(cfg, rank, world), 9)  # crosses the epoch boundary at 5

    first = build_image_loader(cfg, rank, world)
    consumed = _take(first, stop)
    saved = _through_json(first.position)
    first.close()
    assert saved.batches == stop and saved.samples == 2 * stop
    resumed = build_image_loader(cfg, rank, world, saved)
    assert resumed.position.restart == 1
    rest = _take(resumed, 9 - stop)
    assert len(list(resumed)) == 1  # the epoch still ends at batch 10, as in the uninterrupted run
    stream = consumed + rest
    assert [b["key"] for b in stream] == [b["key"] for b in reference]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(stream, reference))


def test_resampled_resume_is_a_fresh_draw_not_a_replay(toy):
    cfg = _cfg(toy, "data.resampled=true", "data.workers=0", "data.shuffle_buffer=0")
    first = build_image_loader(cfg, 0, 1)
    consumed = [b["key"] for b in _take(first, 4)]
    saved = _through_json(first.position)
    resumed = build_image_loader(cfg, 0, 1, saved)
    after = [b["key"] for b in _take(resumed, 4)]
    # a naive restart (restart count not in the seed) would replay `consumed` exactly
    assert after != consumed
    assert resumed.position.restart == 1 and resumed.position.batches == 8 and resumed.position.samples == 16
    # the continuation is itself reproducible from the saved position
    again = build_image_loader(cfg, 0, 1, saved)
    assert [b["key"] for b in _take(again, 4)] == after
    # resampled mode may change the worker count on resume
    more_workers = _cfg(toy, "data.resampled=true", "data.workers=2", "data.shuffle_buffer=0")
    assert len(_take(build_image_loader(more_workers, 0, 1, saved), 3)) == 3


def test_position_state_is_plain_json_and_round_trips(toy):
    cfg = _cfg(toy, "data.resampled=false", "data.workers=0")
    loader = build_image_loader(cfg, 0, 2)
    _take(loader, 7)
    state = loader.position.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert DataPosition.from_state_dict(state) == loader.position
    assert loader.position.epoch(5) == 1


def test_resume_mismatches_fail_with_clear_errors(toy):
    cfg = _cfg(toy, "data.resampled=false", "data.workers=0")
    loader = build_image_loader(cfg, 0, 2)
    _take(loader, 2)
    saved = loader.position
    with pytest.raises(DataError, match="rank 0, not rank 1"):
        build_image_loader(cfg, 1, 2, saved)
    with pytest.raises(DataError, match="same world size"):
        build_image_loader(cfg, 0, 4, saved)
    with pytest.raises(DataError, match="deterministic mode but data.resampled selects resampled"):
        build_image_loader(_cfg(toy, "data.resampled=true"), 0, 2, saved)
    with pytest.raises(DataError, match="unknown keys"):
        DataPosition.from_state_dict({**saved.state_dict(), "bogus": 1})


@pytest.mark.parametrize("resampled", ["true", "false"])
def test_close_then_iterate_again_continues_the_same_stream(toy, resampled):
    cfg = _cfg(toy, f"data.resampled={resampled}", "data.workers=2")
    reference = [b["key"] for b in _take(build_image_loader(cfg, 0, 1), 6)]
    loader = build_image_loader(cfg, 0, 1)
    head = [b["key"] for b in _take(loader, 3)]
    loader.close()  # workers stop; the next iteration restarts them from the live position
    assert head + [b["key"] for b in _take(loader, 3)] == reference
