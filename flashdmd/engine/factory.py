"""Choose and build the engine from the config: ``engine.kind`` and the world size.

local + 1 process -> LocalEngine; local + several processes -> DDPEngine; fsdp -> FSDPEngine;
deepspeed -> DeepSpeedEngine (imported only when chosen: DeepSpeed picks its accelerator at
import and its init must not interfere with other backends, DeepSpeed #7252). The process
group is the launcher's job (flashdmd.infra.distributed.init_distributed); fsdp and deepspeed need it
even for one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from flashdmd.algo.optim import optim_specs
from flashdmd.config import Config
from flashdmd.engine.base import Engine

__all__ = ["build_engine", "optim_specs"]  # optim_specs: the settings every engine is set up with


def build_engine(cfg: Config, device: torch.device | None = None) -> Engine:
    """An engine for ``cfg.engine``, not yet set up (call ``setup`` with the networks)."""
    e = cfg.engine
    distributed = dist.is_available() and dist.is_initialized()
    if e.kind == "local":
        if distributed and dist.get_world_size() > 1:
            from flashdmd.engine.ddp import DDPEngine

            return DDPEngine(device)
        from flashdmd.engine.local import LocalEngine

        return LocalEngine(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not distributed:
        raise RuntimeError(
            f"engine.kind={e.kind} needs a process group; start through the launcher "
            "(flashdmd.infra.distributed.init_distributed) or use engine.kind=local"
        )
    if e.kind == "fsdp":
        from flashdmd.engine.fsdp import FSDPEngine

        return FSDPEngine(
            precision=e.precision,
            gradient_checkpointing=e.gradient_checkpointing,
            offload=e.offload_params or e.offload_optimizer,
            teacher_sharding=e.teacher_sharding,
        )
    if e.kind == "deepspeed":
        from flashdmd.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            precision=e.precision,
            gradient_checkpointing=e.gradient_checkpointing,
            offload_optimizer=e.offload_optimizer,
            offload_params=e.offload_params,
            teacher_sharding=e.teacher_sharding,
            native_layout=e.deepspeed_layout,
            micro_batch=max(cfg.data.shares(dist.get_world_size())),  # the largest share (spec 1.9)
        )
    raise ValueError(f"engine.kind must be local, fsdp or deepspeed, got {e.kind!r}")
