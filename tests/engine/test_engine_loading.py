"""Loading that scales, on 2 gloo ranks (tiny-sdxl, FSDP2 and ZeRO-3): the students are built on
the meta device, and no rank allocates more than its shard of them at any point of setup; the
loaded weights equal a single-process load bit for bit.

Allocated bytes are counted, not RSS: a TorchDispatchMode sees every tensor an aten op creates,
follows each storage until it is freed (a finalizer on the storage), and the peak of the live
total is taken over the whole of ``engine.setup``. Storages that outlive setup and back no
parameter are the optimizer's own shard-sized state (DeepSpeed's fp32 master and gradient
partitions); they are left out, every transient allocation (a full tensor materialised and then
sharded, zero.Init's one module at a time) is counted. Allowed on top of the shard: one tensor in
flight (a slice being read, FSDP2's padded copy), and under ZeRO-3 DeepSpeed's own copy of one
network's partitions into its flat buffer (``deepspeed.initialize``); one network materialised
whole anywhere exceeds both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from allocations import AllocationLog
from engine_world import run_ranks
from torch import Tensor

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _param_storages(engine: Any, names: list[str]) -> set[int]:
    """Storage keys that back the trainable parameters after setup (local shards / partitions)."""
    keys = set()
    for name in names:
        module = engine[name]
        module = getattr(module, "module", module)
        for p in module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else getattr(p, "_local_tensor", p)
            keys.add(local.untyped_storage().data_ptr())
    return keys


def load_run(kind: str, cache: str) -> dict[str, Tensor]:
    """Spawned: build tiny-sdxl's students lazily, set them up under ``kind``, report bytes and weights."""
    from flashdmd.algo.optim import optim_specs
    from flashdmd.config import load_config
    from flashdmd.engine.factory import build_engine
    from flashdmd.nets.registry import build_parts

    cfg = load_config("tiny-sdxl", [f"engine.kind={kind}", f"model.cache_dir={cache}", "model.lora.enabled=false"])
    parts = build_parts(cfg, Path(cache))
    students = {"generator": parts.generator, "fake_score": parts.fake_score}
    full = sum(p.numel() * 4 for m in students.values() for p in m.parameters())
    held = sum(p.untyped_storage().nbytes() for m in students.values() for p in m.parameters() if not p.is_meta)
    largest = max(p.numel() * 4 for m in students.values() for p in m.parameters())
    engine = build_engine(cfg)
    # this rank's share: dim-0 rows split evenly, padded up (FSDP2's layout; ZeRO-3's flat split is no larger)
    shard = sum(-(-p.shape[0] // engine.world_size) * (p.numel() // p.shape[0]) * 4 if p.dim() else 4
                for m in students.values() for p in m.parameters())
    specs = {name: spec for name, spec in optim_specs(cfg).items() if name in students}
    with AllocationLog() as log:
        engine.setup(students, specs, {})
    params = _param_storages(engine, list(students))
    persistent = set(log.live) - params  # optimizer-side state that stays (masters, gradient partitions)
    out = {"full_bytes": torch.tensor(full), "shard_bytes": torch.tensor(shard), "held_after_build": torch.tensor(held),
           "largest_tensor": torch.tensor(largest), "peak": torch.tensor(log.peak(persistent)),
           }
    for name in students:
        out.update({f"{name}.{k}": v for k, v in engine.full_state_dict(name).items()})
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flashdmd.config import load_config
    from flashdmd.nets.registry import build_parts

    folder = tmp_path_factory.getbasetemp() / "nets-cache"  # the session's, shared with tests/nets/test_nets_*
    build_parts(load_config("tiny-sdxl", [f"model.cache_dir={folder}", "model.lora.enabled=false"]), folder)
    return folder


@pytest.fixture(scope="module")
def single_process(cache: Path) -> dict[str, dict[str, Tensor]]:
    from flashdmd.config import load_config
    from flashdmd.nets.registry import build_parts

    parts = build_parts(load_config("tiny-sdxl", [f"model.cache_dir={cache}", "model.lora.enabled=false"]), cache)
    return {"generator": parts.generator.state_dict(), "fake_score": parts.fake_score.state_dict(),
            "teacher": parts.teacher.state_dict()}


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_each_rank_allocates_only_its_shard_and_loads_exact_weights(kind: str, cache: Path, tmp_path: Path,
                                                                    single_process: dict) -> None:
    run = run_ranks(2, load_run, kind, str(cache), tmp=tmp_path)
    full, shard = int(run.pop("full_bytes")), int(run.pop("shard_bytes"))
    assert int(run.pop("held_after_build")) == 0  # the registry built the students without storage
    peak, largest = int(run.pop("peak")), int(run.pop("largest_tensor"))
    flat_copy = shard // 2 if kind == "deepspeed" else 0  # one of the two students' partitions, copied once
    assert peak <= shard + flat_copy + 2 * largest, (peak, shard, largest)
    assert peak < shard + full / 2, (peak, full)  # one student materialised whole would reach this
    for name in ("generator", "fake_score"):
        want = single_process[name]
        got = {k[len(name) + 1:]: v for k, v in run.items() if k.startswith(name + ".")}
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), key  # bit for bit
    teacher = single_process["teacher"]
    assert all(torch.equal(single_process["generator"][k], v.float()) for k, v in teacher.items())
