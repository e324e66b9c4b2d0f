"""flashdmd.infra.distributed and flashdmd.train.preemption on a real GPU (skipped without CUDA): NCCL group,
device choice, the agreement all-reduce on a CUDA tensor, and our USR1 handler surviving NCCL."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.gpu

WORKER = textwrap.dedent("""
    import os, signal
    import torch, torch.distributed as dist
    from flashdmd.config import load_config
    from flashdmd.infra.distributed import init_distributed, shutdown
    from flashdmd.train.preemption import Preemption
    ctx = init_distributed(load_config("gmm2d"))
    guard = Preemption(ctx=ctx, cfg=load_config("gmm2d"))
    x = torch.ones(4, device=ctx.device)
    dist.all_reduce(x)                      # creates the NCCL communicator (which may install handlers)
    torch.cuda.synchronize()
    kept = signal.getsignal(signal.SIGUSR1) == guard._handle
    first = guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGUSR1)
    second = guard.should_stop(1)
    print(f"device={ctx.device} backend={ctx.backend} kept={kept} first={first} second={second} sum={x.sum().item()}")
    shutdown()
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("visible", [None, "0"])
def test_nccl_single_rank_agreement_and_handler(tmp_path, visible):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "RANK", "WORLD_SIZE"))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "device=cuda:0 backend=nccl kept=True" in out.stdout, out.stdout
    assert "first=False second=True sum=4.0" in out.stdout, out.stdout
    print(out.stdout)
