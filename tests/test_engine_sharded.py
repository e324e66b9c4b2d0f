"""FSDP2, DeepSpeed ZeRO-3 and DDP on 2 gloo ranks against the single-process LocalEngine, on the
toy engine world (tests/engine_world.py): a Flash-DMD-shaped iteration with a GAN loss through
the frozen discriminator and decoder, EMA pull of the fake score, three optimizers.

Tolerances: the sharded runs sum gradient norms and all-reduce in a different order than one
process, so weights and losses agree to 1e-5 (observed ~6e-8); a resumed sharded run agrees with
the uninterrupted one to 1e-6; the local engine resumes bitwise (tests/test_checkpoint.py).
"""
from __future__ import annotations

import pytest
import torch

from engine_world import run_ranks, train_run, resume_run

N, K = 4, 2
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} at {worst[1]}"


@pytest.fixture(scope="module")
def local_reference() -> dict[str, torch.Tensor]:
    return train_run("local", N)


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed", "ddp"])
def test_matches_local_and_resumes(kind: str, local_reference: dict[str, torch.Tensor], tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    straight = run_ranks(2, train_run, kind, N, K, str(ckpt), tmp=tmp_path)
    checks = {k: straight.pop(k) for k in list(straight) if k.startswith("check.")}
    # 2 ranks x half the global batch == one process with all of it
    _close(straight, local_reference, atol=1e-5)
    # fresh processes from the step-K checkpoint continue exactly as the uninterrupted run
    resumed = run_ranks(2, resume_run, kind, N, str(ckpt), tmp=tmp_path)
    tail = {k: v for k, v in straight.items() if k.startswith("w.") or int(k.split(".")[1]) >= K}
    _close(resumed, tail, atol=1e-6)
    if kind == "deepspeed":
        assert checks["check.zero_to_fp32_maxdiff"].item() == 0.0  # export == DeepSpeed's consolidation
        assert checks["check.ema_mismatch_raises"].item() == 1

