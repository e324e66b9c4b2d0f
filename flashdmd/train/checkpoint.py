"""One checkpoint = one step directory, written by all ranks together, valid once its marker
exists (DESIGN.md "One checkpoint = one step directory").

Layout of ``<checkpoint_dir>/step-<8 digits>/``::

    <engine files>             every trainable network, optimizer and schedule (Engine.save;
                               frozen networks are never saved, the EMA target is the fake score)
    <name>_ema files           the generator EMA when kept (Engine.save_shadows, spec 6 #20), in
                               the layout of the engine's networks, read back at any world size
    <name>.map.json            per network: layout, names, shapes, dtypes, each rank's slice
                               (flashdmd.engine.checkpoint_map; read by flashdmd.engine.checkpoint_reader)
    trainer.json               trainer state from rank 0: step, MLflow run id, anything the loop adds
    rank<r>.json               per-rank state: data position and Python/NumPy RNG
    rank<r>.rng.safetensors    per-rank torch RNG states
    COMPLETE                   the marker, written LAST by rank 0 after a barrier

A directory without the marker is a save that died midway: ``latest_valid`` ignores it and
``prune`` deletes it once a newer valid step exists. Pruning keeps the newest ``keep_last``
valid steps and never the newest valid one. Only safetensors and JSON are written or read.

Resuming at another world size: the engines re-shard from the map; the per-rank state cannot be
carried one to one, so ``load_checkpoint`` hands every saved rank's state to the caller
(``Resumed.rank_states``, for the data position's re-split, flashdmd.data.position) and re-derives
this rank's RNG from (step, rank) instead of restoring a saved one, and says so in the log.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flashdmd.engine.base import Engine
from flashdmd.engine.state_io import load_json, load_tensors, rng_state, save_json, save_tensors, set_rng_state
from flashdmd.train import faults

log = logging.getLogger("flashdmd.train")
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class Resumed:
    """What ``load_checkpoint`` hands back to the training loop."""

    step: int
    trainer: dict[str, Any]  # trainer.json: step, mlflow_run_id, ...
    rank_state: dict[str, Any] = field(default_factory=dict)  # this rank's data position etc.
    path: Path | None = None
    saved_world_size: int = 1  # ranks that wrote the checkpoint
    world_size: int = 1  # ranks of this run
    rank_states: list[dict[str, Any]] = field(default_factory=list)  # every saved rank's, on a world size change

    @property
    def resharded(self) -> bool:
        """True when the checkpoint was written by another number of ranks than this run has."""
        return self.saved_world_size != self.world_size


def step_dir(checkpoint_dir: Path | str, step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_valid(path: Path) -> bool:
    """A step directory whose marker exists and names its own step."""
    match = _STEP_RE.match(path.name)
    marker = path / MARKER
    if not match or not marker.is_file():
        return False
    try:
        return int(load_json(marker)["step"]) == int(match.group(1))
    except (ValueError, KeyError, TypeError):
        return False


def step_dirs(checkpoint_dir: Path | str) -> list[tuple[int, Path]]:
    """Every ``step-*`` directory, valid or not, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_valid(checkpoint_dir: Path | str) -> Path | None:
    """The newest complete step directory, or None; partial (unmarked) ones are ignored."""
    valid = [p for _, p in step_dirs(checkpoint_dir) if is_valid(p)]
    return valid[-1] if valid else None


def _remove(path: Path) -> None:
    """Marker first, so a concurrent reader never takes a half-deleted directory for valid."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(checkpoint_dir: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` valid steps, and partial steps older than the
    newest valid one. Returns what was removed. Never removes the newest valid step."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
    entries = step_dirs(checkpoint_dir)
    valid = [(s, p) for s, p in entries if is_valid(p)]
    if not valid:
        return []
    newest = valid[-1][0]
    doomed = [p for _, p in valid[:-keep_last]]
    doomed += [p for s, p in entries if s < newest and not is_valid(p)]
    for path in doomed:
        _remove(path)
    return doomed


def _python_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_python_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    engine: Engine,
    checkpoint_dir: Path | str,
    step: int,
    trainer: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Collective: write step ``step`` (engine state, ``trainer`` from rank 0, ``rank_state`` and
    RNG from every rank), then the marker, then prune to ``keep_last`` if given."""
    path = step_dir(checkpoint_dir, step)
    if engine.rank == 0:
        if path.exists():  # an earlier attempt at this step (killed, or a re-save): start clean
            _remove(path)
        path.mkdir(parents=True)
    _barrier()
    engine.save(path)
    engine.save_shadows(path)  # the generator EMA, as network <name>_ema (spec 6 #20)
    faults.mid_save(step)  # test-only kill point (flashdmd/train/faults.py); a no-op otherwise
    tag = f"rank{engine.rank:05d}"
    save_tensors(path / f"{tag}.rng.safetensors", rng_state())
    save_json(path / f"{tag}.json", {"rank_state": rank_state or {}, "rng": _python_rng()})
    if engine.rank == 0:
        save_json(path / "trainer.json", {**(trainer or {}), "step": step, "world_size": engine.world_size})
    _barrier()
    if engine.rank == 0:
        _fsync_dir(path)
        save_json(path / MARKER, {"step": step, "world_size": engine.world_size, "time": time.time()})
        _fsync_dir(path)
        if keep_last is not None:
            prune(checkpoint_dir, keep_last)
    _barrier()
    return path


def load_checkpoint(engine: Engine, path: Path | str, restore_rng: bool = True) -> Resumed:
    """Collective: restore the engine from a valid step directory, and this rank's RNG."""
    path = Path(path)
    if not is_valid(path):
        raise ValueError(f"{path} is not a complete checkpoint (no valid {MARKER} marker); use latest_valid() to pick one")
    trainer = load_json(path / "trainer.json")
    saved, step = int(trainer["world_size"]), int(trainer["step"])
    engine.load(path)
    engine.load_shadows(path)
    if saved == engine.world_size:
        tag = f"rank{engine.rank:05d}"
        mine = load_json(path / f"{tag}.json")
        if restore_rng:
            set_rng_state(load_tensors(path / f"{tag}.rng.safetensors"))
            _set_python_rng(mine["rng"])
        _barrier()
        return Resumed(step=step, trainer=trainer, rank_state=mine["rank_state"], path=path,
                       saved_world_size=saved, world_size=engine.world_size)
    states = [load_json(path / f"rank{r:05d}.json")["rank_state"] for r in range(saved)]
    if restore_rng:
        _derive_rng(step, engine.rank)
    if engine.rank == 0:
        log.info("%s was written by %d ranks, this run has %d: networks and optimizers re-sharded from the "
                 "checkpoint map; RNG re-derived from (step, rank); per-rank state re-split by the caller",
                 path, saved, engine.world_size)
    _barrier()
    mine = states[engine.rank] if engine.rank < saved else {}
    return Resumed(step=step, trainer=trainer, rank_state=mine, path=path, saved_world_size=saved,
                   rank_states=states, world_size=engine.world_size)


def _derive_rng(step: int, rank: int) -> None:
    """Seed torch, Python and NumPy from (step, rank): saved RNG states belong to ranks that are gone."""
    seed = (step * 1_000_003 + rank) % 2**32
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _fsync_dir(path: Path) -> None:
    """Flush the directory entries so the marker cannot reach the disk before the files it vouches for."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
