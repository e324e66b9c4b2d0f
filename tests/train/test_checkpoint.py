"""Step-directory checkpoints (flashdmd/train/checkpoint.py): marker written last, newest valid step
picked, partial steps ignored and pruned, bitwise resume of the local engine in a fresh process,
and a save killed midway (SIGKILL) that leaves the previous step loadable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_world import iteration, resume_run, run_ranks, setup_engine, train_run

from flashdmd.train.checkpoint import MARKER, is_valid, latest_valid, load_checkpoint, prune, save_checkpoint, step_dir
from flashdmd.engine.local import LocalEngine

REPO = Path(__file__).resolve().parents[2]


def _weights(engine: LocalEngine) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n in ("generator", "fake_score", "discriminator") for k, v in engine.full_state_dict(n).items()}


def test_marker_latest_valid_and_prune(tmp_path: Path) -> None:
    engine = setup_engine(LocalEngine("cpu"))
    for step in range(1, 5):
        iteration(engine, step)
        save_checkpoint(engine, tmp_path, step, trainer={"mlflow_run_id": "r"}, keep_last=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000003", "step-00000004"]
    step_dir(tmp_path, 2).mkdir()  # an older save that died: pruned later
    partial = step_dir(tmp_path, 5)
    partial.mkdir()
    (partial / "generator.safetensors").write_bytes(b"half a file")
    assert latest_valid(tmp_path) == step_dir(tmp_path, 4)
    forged = step_dir(tmp_path, 6)
    forged.mkdir()
    (forged / MARKER).write_text(json.dumps({"step": 5}))  # marker of another step: not valid
    assert not is_valid(forged) and latest_valid(tmp_path) == step_dir(tmp_path, 4)
    removed = prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == ["step-00000002", "step-00000003"]
    assert latest_valid(tmp_path) == step_dir(tmp_path, 4) and partial.exists()  # newer partial kept
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(engine, partial)


@pytest.mark.distributed
def test_local_resume_in_fresh_process_is_bitwise(tmp_path: Path) -> None:
    straight = train_run("local", 4, save_at=2, ckpt_dir=str(tmp_path / "ckpt"))
    resumed = run_ranks(1, resume_run, "local", 4, str(tmp_path / "ckpt"), tmp=tmp_path)
    for key, value in resumed.items():
        assert torch.equal(value, straight[key]), key


def test_save_killed_midway_leaves_previous_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests" / "worlds")!r}]
        from engine_world import iteration, setup_engine
        from flashdmd.train.checkpoint import save_checkpoint
        from flashdmd.engine.local import LocalEngine
        engine = setup_engine(LocalEngine("cpu"))
        iteration(engine, 0)
        save_checkpoint(engine, {str(ckpt)!r}, 1, trainer={{"mlflow_run_id": "r"}})
        iteration(engine, 1)
        original = engine.save
        def dying_save(path):
            original(path)  # the networks are on disk, the trainer state and marker are not
            os.kill(os.getpid(), signal.SIGKILL)
        engine.save = dying_save
        save_checkpoint(engine, {str(ckpt)!r}, 2, trainer={{"mlflow_run_id": "r"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert step_dir(ckpt, 2).is_dir() and not is_valid(step_dir(ckpt, 2))
    assert latest_valid(ckpt) == step_dir(ckpt, 1)

    reference = setup_engine(LocalEngine("cpu"))
    iteration(reference, 0)
    engine = setup_engine(LocalEngine("cpu"), scramble=True)
    resumed = load_checkpoint(engine, latest_valid(ckpt))
    assert resumed.step == 1 and resumed.trainer["mlflow_run_id"] == "r"
    expected = _weights(reference)
    assert all(torch.equal(v, expected[k]) for k, v in _weights(engine).items())
    # the next save of step 2 replaces the partial directory and then prunes step 1
    iteration(engine, 1)
    save_checkpoint(engine, ckpt, 2, keep_last=1)
    assert latest_valid(ckpt) == step_dir(ckpt, 2) and not step_dir(ckpt, 1).exists()


@pytest.mark.distributed
def test_sharded_save_killed_on_every_rank_leaves_previous_step(tmp_path: Path) -> None:
    from engine_world import killed_save_run, load_latest_run
    from safetensors.torch import load_file
    from torch.multiprocessing import ProcessExitedException

    ckpt = tmp_path / "ckpt"
    with pytest.raises(ProcessExitedException, match="terminated with signal"):
        run_ranks(2, killed_save_run, "fsdp", str(ckpt), tmp=tmp_path)
    assert step_dir(ckpt, 2).is_dir() and not is_valid(step_dir(ckpt, 2))
    assert latest_valid(ckpt) == step_dir(ckpt, 1)
    loaded = run_ranks(2, load_latest_run, "fsdp", str(ckpt), tmp=tmp_path)
    expected = load_file(str(ckpt / "step1-weights.safetensors"))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_checkpoint_and_hand_over_files_get_the_umask_modes(tmp_path: Path, umask: int) -> None:
    """Atomic writes go through temporary files (mkstemp: 0600) and safetensors writes 0600 files
    itself; both must end with the mode a plain open() gives, or the group sharing a run
    directory cannot read the weights."""
    import os
    import stat

    from flashdmd.config import load_config
    from flashdmd.train.handoff import write_handoff

    old = os.umask(umask)
    try:
        engine = setup_engine(LocalEngine("cpu"))
        iteration(engine, 0)
        path = save_checkpoint(engine, tmp_path / "ckpt", 1, trainer={"mlflow_run_id": "r"})
        cfg = load_config("gmm2d", [f"run_root={tmp_path}", "name=modes"])
        final = write_handoff(engine, {n: engine.modules[n] for n in sorted(engine.trainable)}, cfg, 1, None)
    finally:
        os.umask(old)
    files = [p for p in [*path.iterdir(), *final.iterdir()] if p.is_file()]
    assert any(p.name.endswith(".map.json") for p in files) and any(p.suffix == ".safetensors" for p in files)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_data_positions_re_split_at_another_world_size() -> None:
    """2 -> 1 -> 3 ranks: totals (samples, bad items, items seen) are kept, every rank keeps the common
    batch count, the streams restart fresh; a deterministic stream refuses, naming the fix."""
    from flashdmd.data.bad_samples import DataError
    from flashdmd.data.position import DataPosition, resplit_streams

    saved = []
    for rank in range(2):
        pos = DataPosition.start("resampled", 7, rank, 2, 2)
        pos.batches, pos.samples, pos.seen, pos.raw = 5, 10, 11 + rank, [6, 5]
        pos.bad = {"decode": 1 + rank}
        saved.append({"images": pos.state_dict()})
    one = resplit_streams(saved, 0, 1)
    merged = DataPosition.from_state_dict(one["images"])
    assert (merged.batches, merged.samples, merged.seen, merged.bad) == (5, 20, 23, {"decode": 3})
    resumed = merged.resumed("resampled", 7, 0, 1, 2)
    assert resumed.restart == 1 and resumed.raw == [0, 0] and resumed.world_size == 1
    three = [DataPosition.from_state_dict(resplit_streams([one], r, 3)["images"]) for r in range(3)]
    assert [p.batches for p in three] == [5, 5, 5] and sum(p.samples for p in three) == 20
    assert [p.rank for p in three] == [0, 1, 2]
    exact = DataPosition.start("deterministic", 7, 0, 2, 1).state_dict()
    with pytest.raises(DataError, match="data.resampled=true"):
        resplit_streams([{"images": exact}, {"images": exact}], 0, 1)
