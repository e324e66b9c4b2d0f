"""Rank function for the non-finite policy under every engine (flashdmd/engine/base.py): a good
step, a NaN-gradient step, an Inf-loss step with finite gradients, another good step; records
what each step did to the weights, the optimizer moments and the schedule."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from engine_world import make_engine
from flashdmd.engine.base import OptimSpec


def _moments(engine, name: str) -> Tensor:
    """This rank's Adam moments of ``name``, flattened (whatever optimizer object holds them)."""
    opt = engine.optimizers[name] if hasattr(engine, "optimizers") else engine.engines[name].optimizer.optimizer
    local = [v.to_local() if isinstance(v, DTensor) else v for s in opt.state.values() for v in s.values()]
    return torch.cat([v.detach().flatten().float() for v in local if isinstance(v, Tensor) and v.dim() > 0])


def poisoned_steps(kind: str) -> dict[str, Tensor]:
    torch.manual_seed(0)
    engine = make_engine(kind)
    engine.setup({"net": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))},
                 {"net": OptimSpec(lr=0.1, weight_decay=0.0)}, {})
    x = torch.ones(4, 3)
    out: dict[str, Tensor] = {}

    def run(tag: str, poison: str = "") -> None:
        y = engine["net"](x)
        if poison == "grad":  # on the activation: sharded parameters get their gradients outside autograd
            y.register_hook(lambda g: g * float("nan"))
        loss = y.pow(2).mean()
        if poison == "loss":
            loss = loss + float("inf")  # finite gradients, infinite loss
        engine.backward("net", loss)
        stats = engine.step("net")
        weights = engine.full_state_dict("net")
        out[f"{tag}.skipped"] = torch.tensor(stats.get("skipped", 0.0))
        out[f"{tag}.steps_done"] = torch.tensor(float(engine.schedules["net"].steps_done))
        out[f"{tag}.moments"] = _moments(engine, "net")
        for k, v in weights.items():
            out[f"{tag}.w.{k}"] = v.detach().clone()

    run("good1")
    run("nan_grad", "grad")
    run("inf_loss", "loss")
    run("good2")
    return out
