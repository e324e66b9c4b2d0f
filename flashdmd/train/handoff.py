"""Stage hand-over: the trained networks of a finished run as full weights, independent of engine
and world size.

At the end of a run (and stage 1 in particular) rank 0 writes ``<run_dir>/final/``:
``<network>.safetensors`` for generator, fake score and discriminator (the trainable tensors only:
a LoRA run stores its adapters, the discriminator its heads) and ``handoff.json`` (family, step,
student timesteps, MLflow run id). Stage 2 starts from it (spec 2.1: "Stage 2 starts from the
Stage-1 checkpoint"); its frozen reference policy is the generator as handed over (spec 2.4).
Departure from a full resume: stage 2 starts fresh optimizer states, because its schedule spans
``stage2.iterations`` and it may run under another engine or world size than stage 1.
A hand-over of another family, or with other trainable tensors, is refused with what differs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from flashdmd.config import Config
from flashdmd.engine.base import Engine
from flashdmd.engine.state_io import save_tensors

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


@dataclass
class Handoff:
    folder: Path
    meta: dict[str, Any]
    weights: dict[str, dict[str, Tensor]]

    @property
    def run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")


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
    if engine.rank == 0:
        meta = {"family": cfg.model.family, "step": step, "mlflow_run_id": run_id,
                "student_timesteps": cfg.stage1.student_timesteps, "lora": cfg.model.lora.enabled,
                "networks": sorted(networks)}
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
    folder = find_handoff(init_from)
    meta = json.loads((folder / META).read_text())
    weights = {name: load_file(str(folder / f"{name}.safetensors")) for name in meta["networks"]}
    return Handoff(folder, meta, weights)


def apply_handoff(handoff: Handoff, networks: dict[str, nn.Module], cfg: Config) -> None:
    """Load the handed-over weights into the freshly built networks, after checking they fit."""
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
        expected, got = trainable_keys(module), set(handoff.weights.get(name, {}))
        if expected != got:
            problems.append(f"{name}: the hand-over lacks {sorted(expected - got)[:5]} and has unexpected "
                            f"{sorted(got - expected)[:5]} (the network of this config is built differently from "
                            f"the one stage 1 trained: compare the model section of both configs)")
    if problems:
        raise ValueError(f"stage2.init_from={str(handoff.folder)!r} does not fit this config: " + "; ".join(problems))
    for name, module in networks.items():
        module.load_state_dict(handoff.weights[name], strict=False)
