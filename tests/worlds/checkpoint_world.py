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
            out.update(flatten(full_weights(engine), prefix="s."))
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
