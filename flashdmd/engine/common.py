"""Pieces every engine shares: block discovery, the frozen-network context, the finite check,
metric reduction, the one EMA implementation (on whatever shards a rank holds) and the
per-network memory report."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: the items of the outermost ``nn.ModuleList``s.

    Diffusers keeps its blocks in ModuleLists (``down_blocks``, ``up_blocks``,
    ``transformer_blocks``); the Pixel-GAN heads are a ModuleList too. Lists nested inside a
    block (a block's ``resnets``) belong to that block and are not split further.
    """
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(module)
    return blocks


def enable_gradient_checkpointing(module: nn.Module) -> bool:
    """Switch on the diffusers/transformers gradient checkpointing of the outermost model inside."""
    for m in module.modules():
        enable = getattr(m, "enable_gradient_checkpointing", None) or getattr(m, "gradient_checkpointing_enable", None)
        if callable(enable):
            enable()
            return True
    return False


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def no_grad_collection(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: gradients flow through ``modules`` to their inputs but none is kept for their
    parameters (the generator's GAN loss through the discriminator, DeepSpeed #4923, DMD2's
    requires_grad toggle). Gradients held before entering are restored on exit."""
    saved: list[tuple[nn.Parameter, Tensor | None]] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                saved.append((p, p.grad))
                p.requires_grad_(False)
    try:
        yield
    finally:
        for p, grad in saved:
            p.requires_grad_(True)
            p.grad = grad


def finite_everywhere(*values: Tensor) -> bool:
    """True when every value is finite on every rank: one MIN all-reduce of a flag, so all ranks
    take the same decision about skipping an update."""
    ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def all_reduce_mean(value: Tensor, device: torch.device) -> Tensor:
    """Mean over all ranks (identity without a process group); returns a new tensor."""
    out = value.detach().to(device=device, dtype=torch.float32, copy=True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out.to(value.device)


EmaTarget = nn.Module | Mapping[str, Tensor]


def ema_pairs(target: EmaTarget, source: nn.Module) -> list[tuple[str, Tensor, nn.Parameter]]:
    """The (name, target, source) tensor pairs the EMA updates: the trainable parameters (with
    LoRA: the adapter weights and any unfrozen tensor, spec 1.7 [INF]). The target is a network
    (the fake-score pull) or a name -> tensor mapping keyed like the source's trainable
    parameters (the generator EMA's shadow tensors, flashdmd.engine.shadow).

    Raises when the two do not have the same trainable names and (for two networks) shapes,
    since then their shards would not line up."""
    tgt = dict(target) if isinstance(target, Mapping) else dict(trainable_parameters(target))
    src = dict(trainable_parameters(source))
    if tgt.keys() != src.keys():
        missing = sorted(set(tgt) ^ set(src))[:5]
        raise ValueError(f"EMA needs identical architectures; trainable parameters differ, e.g. {missing}")
    pairs = []
    for name, p in tgt.items():
        q = src[name]
        # a shadow may hold another layout than the parameter (a ZeRO-3 partition beside the
        # partitioned parameter): its pieces are compared in ema_update_, after the shard view
        if not isinstance(target, Mapping) and p.shape != q.shape:
            raise ValueError(f"EMA needs identical architectures; {name} has shape {tuple(p.shape)} vs {tuple(q.shape)}")
        pairs.append((name, p, q))
    return pairs


def _whole(name: str, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    return p.data, q.data


ShardView = Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def ema_update_(target: EmaTarget, source: nn.Module, decay: float, shards: ShardView = _whole,
                store: Callable[[Tensor, Tensor], None] | None = None) -> None:
    """The one EMA of every engine (spec 1.7, Eq. 11): psi <- decay psi + (1 - decay) theta over
    the trainable tensors matched by name (``ema_pairs``), each rank on what it holds. The target
    is another network (the fake-score pull) or a mapping of shadow tensors (the generator EMA).

    ``shards(name, p, q)`` gives this rank's pieces of the target and source tensor (the whole
    tensor on replicas, the local DTensor shard under FSDP2, the fp32 master partition under
    ZeRO-3); they must have equal shapes, which holds because identical architectures are
    partitioned identically. The update is in place unless ``store(p, new)`` writes it back
    (ZeRO-3 keeps the master and its bit16 copy apart). No collective is needed."""
    for name, p, q in ema_pairs(target, source):
        lp, lq = shards(name, p, q)
        if lp.shape != lq.shape:
            raise RuntimeError(f"EMA: this rank's pieces of {name} differ: {tuple(lp.shape)} vs {tuple(lq.shape)}")
        if store is None:
            lp.lerp_(lq.to(lp.dtype), 1.0 - decay)
        else:
            store(p, lp.lerp(lq.to(lp.dtype), 1.0 - decay))


def nbytes(tensors: Iterable[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers before sharding.

    Each rank builds its networks itself; any draw not fixed by the seed (e.g. heads initialised
    after a hash-ordered walk over modules) would otherwise leave the ranks' shards from
    different initialisations. DDP does the same at construction."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def replica_memory(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, dict[str, int]]:
    """Memory report of full replicas (local and DDP engines): per trainable network, bytes of
    parameters, gradients (fp32, one per trainable parameter) and optimizer state."""
    return {
        name: {
            "params": nbytes(modules[name].parameters()),
            "grads": sum(p.numel() * 4 for _, p in trainable_parameters(modules[name])),
            "optimizer": nbytes(v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)),
        }
        for name, opt in sorted(optimizers.items())
    }
