"""Stage-2 start-up that scales, on 2 gloo ranks (tiny-sdxl, FSDP2 and ZeRO-3, teacher_sharding=zero3):
the students, the teacher and the reference policy are built on the meta device and filled from the
stage-1 hand-over (and the teacher folder) a shard at a time; no rank allocates more than its
shard of them during setup, and every loaded tensor equals a single-process load of the same
hand-over bit for bit.

The hand-over is written by the real path (``write_handoff`` from a local engine) after moving
every trainable tensor away from the teacher's values, so a load that read the teacher instead of
the hand-over fails the comparison. Allocated bytes are counted as in
tests/engine/test_engine_loading.py (``AllocationLog``; the optimizer's persistent shard-sized
state left out). Allowed on top of the shards: the discriminator, which stays whole (its frozen
SAM backbone is read like any replicated frozen network; the hand-over holds only its heads),
two tensors in flight, with LoRA one network's adapters copied before sharding, and under ZeRO-3
DeepSpeed's copy of one student's partitions into its flat buffer; one student or the teacher
read whole on a rank exceeds that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from allocations import AllocationLog
from engine_world import run_ranks
from torch import Tensor, nn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SHARDED = ("generator", "fake_score", "teacher", "reference")


def _config(cache: str, handoff: str, lora: bool, *extra: str) -> Any:
    from flashdmd.config import load_config

    return load_config("tiny-sdxl", [f"model.cache_dir={cache}", f"stage2.init_from={handoff}",
                                     f"model.lora.enabled={str(lora).lower()}", *extra])


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _shard_bytes(module: nn.Module, world: int) -> int:
    """This rank's share: dim-0 rows split evenly, padded up (FSDP2's layout; ZeRO-3's flat split is no larger)."""
    return sum((-(-p.shape[0] // world) * (p.numel() // p.shape[0]) if p.dim() else 1) * p.element_size()
               for p in module.parameters())


def _storages(module: nn.Module) -> set[int]:
    module = getattr(module, "module", module)
    return {(p.ds_tensor if hasattr(p, "ds_tensor") else getattr(p, "_local_tensor", p)).untyped_storage().data_ptr()
            for p in module.parameters()}


def _full_frozen(module: nn.Module) -> dict[str, Tensor]:
    """A sharded frozen network's full tensors (collective), as a single process would hold them."""
    if hasattr(module, "module"):  # a ZeRO-3 inference engine
        import deepspeed

        net = module.module
        out = {}
        for name, p in net.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().to("cpu", copy=True)
        persistent = set(net.state_dict(keep_vars=True))
        out.update({n: b.detach().to("cpu", copy=True) for n, b in net.named_buffers() if n in persistent})
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def stage2_load(kind: str, cache: str, handoff: str, lora: bool) -> dict[str, Tensor]:
    """Spawned: stage-2 setup as flashdmd.train.main does it, with the bytes allocated and the weights."""
    from flashdmd.algo.optim import optim_specs
    from flashdmd.engine.factory import build_engine
    from flashdmd.nets.registry import build_parts
    from flashdmd.train.handoff import apply_handoff, read_handoff, reference_policy

    cfg = _config(cache, handoff, lora, f"engine.kind={kind}", "engine.teacher_sharding=zero3")
    parts = build_parts(cfg, Path(cache))
    apply_handoff(read_handoff(cfg.stage2.init_from), parts.trainable(), cfg)
    engine = build_engine(cfg)
    frozen = {"teacher": parts.teacher, "reference": reference_policy(parts.generator, engine.compute_dtype, True)}
    nets = {**parts.trainable(), **frozen}
    # LoRA adapters are given storage at build (flashdmd.nets.lazy), everything else has none
    held = sum(p.untyped_storage().nbytes() for n in SHARDED for k, p in nets[n].named_parameters()
               if not p.is_meta and ".lora_" not in k)
    shard = sum(_shard_bytes(nets[n], engine.world_size) for n in SHARDED)
    student, disc = _bytes(parts.generator), _bytes(parts.discriminator)
    largest = max(p.numel() * p.element_size() for n in SHARDED for p in nets[n].parameters())
    adapters = max(sum(p.numel() * p.element_size() for k, p in nets[n].named_parameters() if ".lora_" in k)
                   for n in SHARDED)
    with AllocationLog() as log:
        engine.setup(parts.trainable(), optim_specs(cfg, 2), frozen)
    params = set().union(*(_storages(engine[n]) for n in nets))
    persistent = set(log.live) - params  # optimizer-side state that stays (masters, gradient partitions)
    out = {"held_after_build": torch.tensor(held), "shard": torch.tensor(shard), "student": torch.tensor(student),
           "discriminator": torch.tensor(disc), "largest": torch.tensor(largest), "adapters": torch.tensor(adapters),
           "teacher_bytes": torch.tensor(_bytes(parts.teacher)), "peak": torch.tensor(log.peak(persistent))}
    for name in parts.trainable():
        out.update({f"{name}.{k}": v for k, v in engine.full_state_dict(name).items()})
    for name in frozen:
        out.update({f"{name}.{k}": v for k, v in _full_frozen(engine[name]).items()})
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def handoff(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bool]:
    """A tiny-sdxl cache and a hand-over whose trainable tensors all differ from the teacher's (or,
    with LoRA, from PEFT's initialisation: the hand-over then holds the adapters, the teacher the base)."""
    from flashdmd.algo.optim import optim_specs
    from flashdmd.engine.factory import build_engine
    from flashdmd.nets.registry import build_parts
    from flashdmd.train.handoff import write_handoff

    lora = request.param
    root = tmp_path_factory.mktemp("stage2-loading")
    cache = tmp_path_factory.getbasetemp() / "nets-cache"  # the session's, shared with tests/nets/test_nets_*
    cfg = _config(str(cache), "", lora, f"run_root={root}", "name=stage1")
    parts = build_parts(cfg, cache)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in parts.trainable().values():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen), alpha=1e-2)
    engine = build_engine(cfg)
    engine.setup(parts.trainable(), optim_specs(cfg, 1), parts.frozen())
    return cache, write_handoff(engine, parts.trainable(), cfg, 1, None), lora


@pytest.fixture(scope="module")
def single_process(handoff: tuple[Path, Path, bool]) -> dict[str, dict[str, Tensor]]:
    from flashdmd.nets.registry import build_parts
    from flashdmd.train.handoff import apply_handoff, read_handoff, reference_policy

    cache, folder, lora = handoff
    cfg = _config(str(cache), str(folder), lora)
    parts = build_parts(cfg, cache, lazy=False)
    apply_handoff(read_handoff(str(folder)), parts.trainable(), cfg)
    reference = reference_policy(parts.generator, torch.float32, False)
    fresh = build_parts(cfg, cache, lazy=False).generator.state_dict()  # what stage 2 would hold without the files
    handed = read_handoff(str(folder)).keys("generator")
    assert handed and all(not torch.equal(fresh[k], parts.generator.state_dict()[k]) for k in handed)
    return {**{n: m.state_dict() for n, m in parts.trainable().items()}, "teacher": parts.teacher.state_dict(),
            "reference": reference.state_dict()}


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_stage2_ranks_read_only_their_shard_of_the_handoff(kind: str, handoff: tuple[Path, Path, bool],
                                                          tmp_path: Path, single_process: dict) -> None:
    cache, folder, lora = handoff
    run = run_ranks(2, stage2_load, kind, str(cache), str(folder), lora, tmp=tmp_path)
    assert int(run.pop("held_after_build")) == 0  # built without storage, teacher and reference included
    shard, student, disc = int(run.pop("shard")), int(run.pop("student")), int(run.pop("discriminator"))
    peak, largest, teacher = int(run.pop("peak")), int(run.pop("largest")), int(run.pop("teacher_bytes"))
    flat_copy = student // 2 if kind == "deepspeed" else 0  # one student's partitions, copied once
    # plus, with LoRA, one network's adapters copied before sharding (remember_memory_tensors)
    allowed = shard + disc + flat_copy + int(run.pop("adapters"))
    assert peak <= allowed + 2 * largest, (peak, allowed, largest)
    assert peak < allowed + min(student, teacher) / 2, (peak, student)  # one net read whole exceeds this
    for name, want in single_process.items():
        got = {k[len(name) + 1:]: v for k, v in run.items() if k.startswith(name + ".")}
        extra = got.keys() - want.keys()  # ZeRO-3's full_state_dict also lists SAM's non-persistent mean/std
        assert want and want.keys() <= got.keys() and extra <= {"backbone.mean", "backbone.std"}, (name, extra)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (name, key)  # bit for bit


def test_a_handoff_of_another_network_is_refused_by_name(handoff: tuple[Path, Path, bool]) -> None:
    """The meta-built networks are checked against the hand-over's headers, with today's message."""
    from flashdmd.nets.registry import build_parts
    from flashdmd.train.handoff import apply_handoff, read_handoff

    cache, folder, lora = handoff
    cfg = _config(str(cache), str(folder), not lora, "engine.kind=fsdp")
    parts = build_parts(cfg, cache, lazy=True)
    adapters, base = r"\['[^\]]*lora_A[^\]]*\]", r"\['model\.[^\]]*\]"
    lacks, extra = (base, adapters) if lora else (adapters, base)  # a LoRA hand-over holds adapters, not the base
    with pytest.raises(ValueError, match=rf"does not fit this config: .*model.lora.enabled=.*generator: the hand-over "
                                         rf"lacks {lacks} and has unexpected {extra}"):
        apply_handoff(read_handoff(str(folder)), parts.trainable(), cfg)
