"""The generator EMA under DeepSpeed ZeRO-3 (spec 6 #20 [INF], flashdmd.engine.shadow): this rank's
pieces of the fp32 master partitions, updated against the masters without any gathering.

Checkpointed like the ZeRO-3 networks: rank r writes ``<step>/<name>_ema/rank<r>.safetensors``
holding the flat sub-group partitions ``fp32.<g>`` (the pieces packed in the optimizer's
sub-group order), rank 0 the map (layout ``zero3``, every tensor's sub-group, offset and
partition, flashdmd.engine.checkpoint_map). Loading cuts this rank's piece out of the full
tensors by ZeRO-3's partition rule, so any world size and any engine's step directory resumes.
Imported by flashdmd.engine.deepspeed after DeepSpeed has picked its accelerator.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param
from torch import Tensor, nn

from flashdmd.engine.checkpoint_map import write_map, zero3_entries, zero3_local_slice
from flashdmd.engine.shadow import Shadow, check_shape
from flashdmd.engine.state_io import save_tensors


def _master_piece(name: str, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The shadow's piece and the source's local fp32 master partition."""
    return p, safe_get_local_fp32_param(q)


class Zero3Shadow(Shadow):
    """Flat fp32 pieces, one per trainable parameter, as long as its ZeRO-3 partition."""

    def __init__(self, network: str, module: nn.Module, decay: float, sub_groups: list[list[nn.Parameter]]) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sub_groups = sub_groups  # the optimizer's fp16_groups: the packing order of the partitions
        names = {id(p): n for n, p in module.named_parameters()}
        self.groups = [[names[id(p)] for p in params] for params in sub_groups]
        self.params = dict(module.named_parameters())
        super().__init__(network, module, decay, _master_piece)

    def _piece(self, param: Tensor) -> Tensor:
        return safe_get_local_fp32_param(param).detach().to(torch.float32, copy=True)

    def _set_piece(self, key: str, full: Tensor) -> None:
        param = self.params[key]
        check_shape(self.name, key, full, param.ds_shape)
        self.tensors[key].copy_(zero3_local_slice(full.reshape(-1).float(), self.rank, self.world_size))

    def save(self, step_dir: Path) -> None:
        folder = Path(step_dir) / self.name
        flats = {f"fp32.{g}": torch.cat([self.tensors[n] for n in names]) for g, names in enumerate(self.groups)}
        save_tensors(folder / f"rank{self.rank:05d}.safetensors", flats)
        if self.rank == 0:
            write_map(step_dir, self.name, "deepspeed", "zero3", self.world_size,
                      zero3_entries(self.module, self.sub_groups))
        dist.barrier()

    def full_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for key in sorted(self.tensors):
            piece, param = self.tensors[key], self.params[key]
            pieces = [torch.empty_like(piece) for _ in range(self.world_size)]
            dist.all_gather(pieces, piece.contiguous())
            if self.rank == 0:
                out[key] = torch.cat(pieces)[: param.ds_numel].view(param.ds_shape).to("cpu", copy=True)
        return out
