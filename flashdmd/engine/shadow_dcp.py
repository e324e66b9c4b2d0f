"""The generator EMA under FSDP2 (spec 6 #20 [INF], flashdmd.engine.shadow): DTensor copies of the
trainable parameters, sharded exactly as they are, updated shard by shard.

Checkpointed like the FSDP2 networks: a torch.distributed.checkpoint folder ``<step>/<name>_ema/``
in Hugging Face safetensors storage (tensors ``model.<key>``, each chunk's offsets in its file's
header) and the map (layout ``dcp``) on rank 0, so one CPU process reads it
(flashdmd.engine.checkpoint_reader). Loading cuts each rank's shard out of the full tensors the
reader assembles, so any world size and any engine's step directory resumes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from flashdmd.engine import common
from flashdmd.engine.checkpoint_map import tensor_entry, write_map
from flashdmd.engine.shadow import Shadow, check_shape


def reshard_all(module: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``module``: a no-grad forward may have left blocks gathered, and
    an EMA must read and write the shards, not the gathered tensors."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class DTensorShadow(Shadow):
    """fp32 DTensors with the parameters' mesh and placements (``shards``: the engine's view,
    which refuses two tensors sharded differently)."""

    def __init__(self, network: str, module: nn.Module, decay: float, shards: common.ShardView) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        super().__init__(network, module, decay, shards)

    def _set_piece(self, key: str, full: Tensor) -> None:
        piece = self.tensors[key]
        check_shape(self.name, key, full, piece.shape)
        if not isinstance(piece, DTensor):
            piece.copy_(full)
            return
        # every rank read the same full tensor, so each cuts its own shard without communication
        mine = distribute_tensor(full.to(piece.to_local().device, torch.float32), piece.device_mesh,
                                 piece.placements, src_data_rank=None)
        piece.to_local().copy_(mine.to_local())

    @torch.no_grad()
    def update_(self) -> None:
        reshard_all(self.module)
        super().update_()

    def save(self, step_dir: Path) -> None:
        folder = Path(step_dir) / self.name
        state = {f"model.{k}": v for k, v in self.tensors.items()}
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
        if self.rank == 0:
            write_map(step_dir, self.name, "fsdp", "dcp", self.world_size,
                      {k: tensor_entry(v) for k, v in self.tensors.items()})
        dist.barrier()

    def full_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for key in sorted(self.tensors):
            piece = self.tensors[key]
            full = piece.full_tensor() if isinstance(piece, DTensor) else piece
            if self.rank == 0:
                out[key] = full.detach().to("cpu", copy=True)
        return out
