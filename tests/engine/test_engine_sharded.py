"""FSDP2, DeepSpeed ZeRO-3 and DDP on 2 gloo ranks against the single-process LocalEngine, on the
toy engine world (tests/worlds/engine_world.py): a Flash-DMD-shaped iteration with a GAN loss through
the frozen discriminator and decoder, EMA pull of the fake score, three optimizers.

Tolerance: the sharded runs sum gradient norms and all-reduce in a different order than one
process, so weights and losses agree to 1e-5 (observed ~6e-8). Resume of the sharded engines is
tested on tiny-sdxl (tests/engine/test_engine_stage1.py), bitwise local resume in tests/train/test_checkpoint.py,
resume at another world size and the step directories training writes (read on one process, by
DeepSpeed's zero_to_fp32, by the apps) in tests/engine/test_checkpoint_reshard.py and test_checkpoint_apps.py.
"""
from __future__ import annotations

import pytest
import torch
from engine_world import run_ranks, train_run

N = 4
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} at {worst[1]}"


@pytest.fixture(scope="module")
def local_reference() -> dict[str, torch.Tensor]:
    return train_run("local", N)


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed", "ddp"])
def test_two_ranks_match_one_process(kind: str, local_reference: dict[str, torch.Tensor], tmp_path) -> None:
    run = run_ranks(2, train_run, kind, N, 0, str(tmp_path), tmp=tmp_path)
    checks = {k: run.pop(k) for k in list(run) if k.startswith("check.")}
    # 2 ranks x half the global batch == one process with all of it (every network, every loss)
    _close(run, local_reference, atol=1e-5)
    if kind == "deepspeed":
        assert checks["check.zero_to_fp32_maxdiff"].item() == 0.0  # export == DeepSpeed's consolidation
        assert checks["check.ema_mismatch_raises"].item() == 1  # unlike networks refuse the EMA pull
