"""Step directories of every engine read back on one process, and resumed at another world size.

The toy engine world (tests/worlds/engine_world.py, checkpoint_world.py) trains one fixed global
batch sharded over the ranks, so runs on 1 and 2 ranks agree to fp32 summation order (~1e-7):
a 2-rank FSDP2 / ZeRO-3 step directory resumed on 1 rank (and a 1-rank one on 2) must finish
where the uninterrupted run at the new world size does, every network, optimizer moment and
the fake score's EMA included (a wrong re-partition or a lost moment moves the weights by far
more than 1e-5 after two Adam steps). The single-process reader must give exactly the tensors
the engine held when it saved, and DeepSpeed's own zero_to_fp32 the same on ZeRO-3 directories.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_world import resume, train_save
from engine_world import run_ranks

from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.train.checkpoint import latest_valid

N, SAVE = 4, 2
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _at_save(run: dict[str, torch.Tensor], net: str) -> dict[str, torch.Tensor]:
    prefix = f"s.{net}."
    return {k[len(prefix):]: v for k, v in run.items() if k.startswith(prefix)}


@pytest.fixture(scope="module", params=["fsdp", "deepspeed"])
def sharded(request, tmp_path_factory) -> tuple[str, Path, dict[int, dict[str, torch.Tensor]]]:
    """One uninterrupted run per world size (1 and 2 ranks), each saving at step SAVE."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    runs = {w: run_ranks(w, train_save, kind, N, SAVE, str(root / f"ranks{w}"), tmp=root) for w in (1, 2)}
    return kind, root, runs


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_equals_the_uninterrupted_run(sharded, saved: int, resumed: int) -> None:
    kind, root, runs = sharded
    got = run_ranks(resumed, resume, kind, N, str(root / f"ranks{saved}"), tmp=root)
    uninterrupted = {k: v for k, v in runs[resumed].items() if k.startswith("w.")}
    worst = _worst(got, uninterrupted)
    assert worst <= 1e-5, f"{kind} {saved}->{resumed} ranks: {worst:.3g} from the uninterrupted {resumed}-rank run"


def test_one_process_reads_what_the_engine_held(sharded) -> None:
    kind, root, runs = sharded
    for world in (1, 2):
        step = latest_valid(root / f"ranks{world}")
        reader = CheckpointReader(step)
        assert reader.networks() == ["discriminator", "fake_score", "generator"]
        for net in reader.networks():
            assert reader.map(net)["world_size"] == world
            held = _at_save(runs[world], net)
            read = reader.state_dict(net)
            # frozen tensors (the discriminator's backbone) are never checkpointed
            assert set(read) == {k for k in held if not k.startswith("backbone.")}
            assert all(torch.equal(read[k], held[k]) for k in read), net
        if kind == "deepspeed":  # DeepSpeed's own consolidation of the layout written beside ours
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            theirs = get_fp32_state_dict_from_zero_checkpoint(str(step / "generator"))
            ours = reader.state_dict("generator")
            assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_full_replica_step_dirs_read_back_and_resume_on_one_rank(tmp_path: Path) -> None:
    """DDP writes the local layout once: the reader gives it back; one rank resumes from two."""
    two = run_ranks(2, train_save, "ddp", N, SAVE, str(tmp_path / "ddp"), tmp=tmp_path)
    reader = CheckpointReader(latest_valid(tmp_path / "ddp"))
    assert reader.map("generator")["engine"] == "ddp"
    read = reader.state_dict("generator")
    assert read.keys() == _at_save(two, "generator").keys()
    assert all(torch.equal(v, _at_save(two, "generator")[k]) for k, v in read.items())
    got = run_ranks(1, resume, "local", N, str(tmp_path / "ddp"), tmp=tmp_path)
    assert _worst(got, {k: v for k, v in two.items() if k.startswith("w.")}) <= 1e-5
