"""Stage hand-over: the trained networks of a finished run as full weights, independent of engine
and world size.

At the end of a run (and stage 1 in particular) rank 0 writes ``<run_dir>/final/``:
``<network>.safetensors`` for generator, fake score and discriminator (the trainable tensors only:
a LoRA run stores its adapters, the discriminator its heads) and ``handoff.json`` (family, step,
student timesteps, MLflow run id), plus ``generator_ema.safetensors`` when the run kept the
generator EMA (``stage1.generator_ema``, spec 6 #20; stage 2 continues it). Stage 2 starts from
it (spec 2.1: "Stage 2 starts from the Stage-1 checkpoint"); its frozen reference policy is the
generator as handed over (spec 2.4).
Departure from a full resume: stage 2 starts fresh optimizer states, because its schedule spans
``stage2.iterations`` and it may run under another engine or world size than stage 1.
A hand-over of another family, or with other trainable tensors, is refused with what differs.

Reading scales like stage 1's teacher read (DESIGN.md "scale is a design input"): the files are
opened through ``flashdmd.engine.checkpoint_reader`` one tensor (or one range of rows) at a time,
never whole. A network the registry built on the meta device (a sharded engine,
``flashdmd.nets.lazy``) gets the hand-over as its weights source, layered over its own (a LoRA
hand-over holds the adapters, the teacher folder the base), and the engine fills each rank's
shard; a whole network is loaded tensor by tensor. The reference policy is built the same way,
as a copy of the generator's recipe read in the compute dtype: sharded with the teacher
(``engine.teacher_sharding=zero3``), else whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flashdmd.algo.stage2 import reference_copy
from flashdmd.config import Config
from flashdmd.engine.base import Engine
from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.engine.state_io import save_tensors
from flashdmd.nets.lazy import CastWeights, LayeredWeights, LazyNet, Weights, materialize, meta_module, source_of

FINAL = "final"
META = "handoff.json"


def trainable_keys(module: nn.Module) -> set[str]:
    """State-dict keys a trainable network hands over: parameters that require grad, and the
    persistent buffers. A buffer registered with ``persistent=False`` (the discriminator's SAM
    pixel mean/std) is rebuilt by the network's constructor and is in no state dict, so it is
    neither written nor expected."""
    persistent = set(module.state_dict(keep_vars=True))
    buffers = {n for n, _ in module.named_buffers()} & persistent
    return {n for n, p in module.named_parameters() if p.requires_grad} | buffers


class HandoffWeights(Weights):
    """One network of a hand-over as a weights source: a tensor, or a range of its rows, per read."""

    def __init__(self, reader: CheckpointReader, network: str, dtype: torch.dtype = torch.float32) -> None:
        self.reader, self.network, self.dtype = reader, network, dtype
        self.names = set(reader.keys(network))

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        tensor = self.reader.tensor(self.network, name, rows)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


@dataclass
class Handoff:
    folder: Path
    meta: dict[str, Any]
    reader: CheckpointReader

    @property
    def run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")

    def keys(self, network: str) -> set[str]:
        """The tensor names handed over for ``network`` (from the file header: nothing is read)."""
        return set(self.reader.keys(network)) if network in self.meta["networks"] else set()

    def weights(self, network: str) -> HandoffWeights:
        return HandoffWeights(self.reader, network)


def write_handoff(engine: Engine, networks: dict[str, nn.Module], cfg: Config, step: int,
                  run_id: str | None) -> Path:
    """Collective (full weights are gathered on rank 0); rank 0 writes ``<run_dir>/final``."""
    folder = cfg.run_dir / FINAL
    for name, module in networks.items():
        full = engine.full_state_dict(name)
        if engine.rank == 0:
            keep = trainable_keys(module)
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.contiguous() for k, v in full.items() if k in keep}
            save_tensors(folder / f"{name}.safetensors", tensors)  # the umask's modes, atomically
    emas = {engine.shadows[n].name: engine.ema_full_state_dict(n) for n in sorted(engine.shadows)}  # spec 6 #20
    if engine.rank == 0:
        for name, tensors in emas.items():  # <network>_ema: trainable tensors only, read over the network's
            save_tensors(folder / f"{name}.safetensors", tensors)
        meta = {"family": cfg.model.family, "step": step, "mlflow_run_id": run_id,
                "student_timesteps": cfg.stage1.student_timesteps, "lora": cfg.model.lora.enabled,
                "networks": sorted([*networks, *emas])}
        (folder / META).write_text(json.dumps(meta, indent=1))  # written last: the folder is complete
    return folder


def find_handoff(init_from: str) -> Path:
    """``stage2.init_from`` may name a run directory or its ``final`` folder."""
    path = Path(init_from)
    for folder in (path, path / FINAL):
        if (folder / META).is_file():
            return folder
    raise FileNotFoundError(
        f"stage2.init_from={init_from!r}: no finished stage-1 run there (expected {path / FINAL / META}); "
        "run stage 1 to the end first, or point at its run directory"
    )


def read_handoff(init_from: str) -> Handoff:
    """The hand-over's description; its weights are read later, by the networks that need them."""
    folder = find_handoff(init_from)
    meta = json.loads((folder / META).read_text())
    return Handoff(folder, meta, CheckpointReader(folder))


def check_handoff(handoff: Handoff, networks: dict[str, nn.Module], cfg: Config) -> None:
    """Refuse a hand-over that does not fit the freshly built networks (on the meta device or whole)."""
    problems = []
    if handoff.meta["family"] != cfg.model.family:
        problems.append(f"family {handoff.meta['family']!r} != model.family {cfg.model.family!r}")
    if handoff.meta["student_timesteps"] != cfg.stage1.student_timesteps:
        problems.append(f"student timesteps {handoff.meta['student_timesteps']} != stage1.student_timesteps "
                        f"{cfg.stage1.student_timesteps}")
    if handoff.meta.get("lora", cfg.model.lora.enabled) != cfg.model.lora.enabled:
        problems.append(f"the hand-over was trained with model.lora.enabled={handoff.meta['lora']}, this config has "
                        f"{cfg.model.lora.enabled}")
    for name, module in networks.items():
        expected, got = trainable_keys(module), handoff.keys(name)
        if expected != got:
            problems.append(f"{name}: the hand-over lacks {sorted(expected - got)[:5]} and has unexpected "
                            f"{sorted(got - expected)[:5]} (the network of this config is built differently from "
                            f"the one stage 1 trained: compare the model section of both configs)")
    if problems:
        raise ValueError(f"stage2.init_from={str(handoff.folder)!r} does not fit this config: " + "; ".join(problems))


@torch.no_grad()
def apply_handoff(handoff: Handoff, networks: dict[str, nn.Module], cfg: Config) -> None:
    """After checking they fit: a meta-built network reads the hand-over where the engine places
    it (its source, layered over its own); a whole network copies it in, one tensor at a time."""
    check_handoff(handoff, networks, cfg)
    for name, module in networks.items():
        lazy = source_of(module)
        if lazy is not None:
            lazy.weights = LayeredWeights(handoff.weights(name), lazy.weights)
            continue
        targets = module.state_dict(keep_vars=True)
        for key in sorted(handoff.keys(name)):
            targets[key].copy_(handoff.reader.tensor(name, key))


def reference_policy(generator: nn.Module, dtype: torch.dtype | None, sharded: bool) -> nn.Module:
    """The frozen reference policy (spec 2.4): the generator as handed over, in the policy's compute
    dtype. A meta-built generator gives its recipe: on the meta device for the engine to shard
    (``sharded``: teacher_sharding=zero3), else read whole; a whole generator is copied."""
    lazy = source_of(generator)
    if lazy is None:
        return reference_copy(generator, dtype)

    def build() -> nn.Module:
        reference = lazy.build().requires_grad_(False)
        return reference if dtype is None else reference.to(dtype)

    weights = lazy.weights if dtype is None else CastWeights(lazy.weights, dtype)
    net = LazyNet(build, weights)
    return meta_module(net) if sharded else materialize(net)
