"""Spawned runs for the checkpoint tests (tests/engine/test_checkpoint_*.py): the toy engine world of
engine_world.py trained, saved through ``save_checkpoint`` and resumed at another world size.

The toy iteration shards one fixed global batch over the ranks, so 1 and 2 ranks compute the same
updates up to summation order: a resume at another world size must land on the uninterrupted run
at the new world size within fp32 tolerance.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from engine_world import flatten, full_weights, iteration, make_engine, setup_engine


def train_save(kind: str, n: int, save_at: int, ckpt_dir: str) -> dict[str, Tensor]:
    """``n`` iterations; a checkpoint after ``save_at``. Returns final weights (``w.``) and those at the save (``s.``)."""
    from flashdmd.train.checkpoint import save_checkpoint

    engine = setup_engine(make_engine(kind))
    out: dict[str, Tensor] = {}
    for step in range(n):
        iteration(engine, step)
        if save_at and step + 1 == save_at:
            save_checkpoint(engine, ckpt_dir, save_at, trainer={"mlflow_run_id": "run-1"},
                            rank_state={"position": 10 * save_at + engine.rank})
            out.update({k: v.clone() for k, v in flatten(full_weights(engine), prefix="s.").items()})
    out.update(flatten(full_weights(engine), prefix="w."))
    return out


def resume(kind: str, n: int, ckpt_dir: str) -> dict[str, Tensor]:
    """Fresh processes, scrambled trainable weights, the newest valid checkpoint, then on to ``n``."""
    from flashdmd.train.checkpoint import latest_valid, load_checkpoint

    engine = setup_engine(make_engine(kind), scramble=True)
    resumed = load_checkpoint(engine, latest_valid(Path(ckpt_dir)))
    assert [s["position"] for s in resumed.rank_states or [resumed.rank_state]] == [
        10 * resumed.step + r for r in range(resumed.saved_world_size)] or not resumed.resharded
    for step in range(resumed.step, n):
        iteration(engine, step)
    return flatten(full_weights(engine), prefix="w.")


# ------------------------------------------------------------ tiny-sdxl training runs (subprocesses)
def make_shards(root: Path) -> str:
    """Toy WebDataset shards for tiny-sdxl; returns the data.shards brace pattern."""
    import subprocess
    import sys

    from flashdmd.config import REPO_ROOT

    shards = root / "shards"
    subprocess.run([sys.executable, str(REPO_ROOT / "data_tools" / "make_toy_shards.py"), str(shards), "--count", "16",
                    "--per-shard", "8", "--size", "64"], check=True, capture_output=True)
    return f"{shards}/toy-{{000000..000001}}.tar"


def train_overrides(root: Path, name: str, kind: str, shards: str, iterations: int, cache: Path) -> list[str]:
    """A tiny-sdxl stage-1 run under ``kind`` (local = DDP on several ranks), a checkpoint every step."""
    return [f"run_root={root}", f"name={name}", f"model.cache_dir={cache}", f"engine.kind={kind}",
            f"data.shards={shards}", f"stage1.iterations={iterations}", "checkpoint.every=1", "checkpoint.keep_last=10",
            "tracking.sample_every=0", "tracking.log_every=1", "engine.collective_timeout_s=120"]


def launch_train(overrides: list[str], world: int, faults: str = "", timeout_s: float = 600) -> tuple[list[int], str]:
    """``world`` ranks of ``python -m flashdmd.train --config tiny-sdxl`` over gloo; (return codes, rank 0's log)."""
    import os
    import subprocess
    import sys

    from flashdmd.config import REPO_ROOT
    from flashdmd.train.faults import ENV

    from engine_world import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(REPO_ROOT))
        env.pop(ENV, None)
        if faults:
            env[ENV] = faults
        procs.append(subprocess.Popen([sys.executable, "-m", "flashdmd.train", "--job", "stage1", "--config", "tiny-sdxl",
                                       *overrides], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    return [p.returncode for p in procs], logs[0]
