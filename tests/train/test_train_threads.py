"""flashdmd.train.main.split_cpu_threads: CPU ranks of one node share the cores (profiling:
two ranks with torch's default thread count on two cores ran a tiny-sdxl step 13-21x slower)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashdmd.train.main import split_cpu_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _ctx(device: str, local_world_size: int) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), local_world_size=local_world_size)


def test_ranks_split_the_cores(threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    torch.set_num_threads(8)
    split_cpu_threads(_ctx("cpu", 4))
    assert torch.get_num_threads() == 2
    split_cpu_threads(_ctx("cpu", 1))  # never raises a count the process already lowered
    assert torch.get_num_threads() == 2
    torch.set_num_threads(8)
    split_cpu_threads(_ctx("cpu", 16))  # more ranks than cores: one thread each
    assert torch.get_num_threads() == 1


def test_explicit_setting_and_gpus_are_left_alone(threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    split_cpu_threads(_ctx("cpu", 4))
    assert torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    split_cpu_threads(_ctx("cuda", 4))
    assert torch.get_num_threads() == 3
