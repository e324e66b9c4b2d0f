"""Two real ranks over gloo, two DataLoader workers each, uneven shards: a collective per batch (as
a training step has) never hangs, and each rank's stream is the one its explicit (rank, world_size)
gives in a single process, which the other data tests use to simulate ranks."""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_tools.make_toy_shards import make_toy_shards
from flashdmd.config import load_config
from flashdmd.data import build_image_loader

MODES = ("false", "true")  # data.resampled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(pattern: str, resampled: str):
    return load_config("tiny-sdxl", [f"data.shards={pattern}", "data.resolution=16", "data.batch_size=2", "data.workers=2",
                                     "data.epoch_length=6", "data.shuffle_buffer=2", f"data.resampled={resampled}"])


def _rank_main(rank: int, world: int, port: int, pattern: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for resampled in MODES:
            loader = build_image_loader(_cfg(pattern, resampled), dist.get_rank(), dist.get_world_size())
            keys = []
            for _ in range(2):  # two epochs
                for batch in loader:
                    dist.all_reduce(torch.ones(1))  # a step's collective: a rank with fewer batches would hang here
                    keys.extend(batch["key"])
            loader.close()
            gathered: list = [None] * world
            dist.all_gather_object(gathered, keys)
            if rank == 0:
                out[resampled] = gathered
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_with_two_workers_each(tmp_path):
    # 8 shards of uneven size (3..10 samples): a split of whole shards gives ranks unequal data
    start = 0
    for i, n in enumerate(range(3, 11)):
        make_toy_shards(tmp_path, count=n, per_shard=n, size=16, prefix=f"s{i}", start=start)
        start += n
    pattern = str(tmp_path / "s{0..7}-000000.tar")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(2, _free_port(), pattern, out), nprocs=2, start_method="spawn")
        result = {mode: list(out[mode]) for mode in MODES}
    for mode, per_rank in result.items():
        assert [len(k) for k in per_rank] == [24, 24], mode  # 2 epochs x 6 batches x 2 samples, and no hang
        assert all(set(keys) <= {f"{i:08d}" for i in range(start)} for keys in per_rank)
    deterministic = result["false"]
    for rank in range(2):
        loader = build_image_loader(_cfg(pattern, "false"), rank, 2)
        assert [k for _ in range(2) for b in loader for k in b["key"]] == deterministic[rank]
    assert not set(deterministic[0][:6]) & set(deterministic[1][:6])  # the first batches come from disjoint shards
