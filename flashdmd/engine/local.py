"""Single-process engine: plain torch modules and AdamW optimizers on one device.

Implements the ``Engine`` ABC fully; the DDP, FSDP2 and DeepSpeed engines build on the same
shape. Subclasses change behaviour through three hooks: ``_wrap`` (what forward runs on, e.g. a
DDP wrapper), ``_make_optimizer`` and ``all_reduce_mean``.

Checkpoint layout of one step directory (written by ``save``, read by ``load``):
``<name>.safetensors`` (the trainable parameters and buffers of network ``name``; a
discriminator's frozen backbone is left out, DESIGN.md "frozen networks are never
checkpointed"), ``<name>.optim.safetensors`` (optimizer tensors, keyed ``<param>.<state key>``),
``<name>.optim.json`` (the non-tensor optimizer state and the LR schedule's step counter),
``<name>.map.json`` (the map: layout ``full``, names, shapes, dtypes; flashdmd.engine.checkpoint_map).
A kept generator EMA (``track_ema``, spec 6 #20) adds ``<name>_ema.safetensors`` and its map
(flashdmd.engine.shadow.FullShadow).
Nothing is pickled; every file is written atomically (``state_io.atomic_write``). Full replicas
resume at any world size.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from flashdmd.engine import common
from flashdmd.engine.base import Engine, OptimSpec
from flashdmd.engine.checkpoint_map import tensor_entry, write_map
from flashdmd.engine.lr import StepSchedule
from flashdmd.engine.shadow import FullShadow, Shadow
from flashdmd.engine.state_io import load_json, save_json, save_tensors


def checkpoint_state(module: nn.Module) -> dict[str, Tensor]:
    """What a trainable network saves: parameters that require grad, and every buffer."""
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())
    return {k: v.detach().contiguous().cpu() for k, v in {**trainable, **buffers}.items()}


class LocalEngine(Engine):
    kind = "local"  # the engine named in checkpoint maps

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rank, self.world_size = 0, 1
        self.modules: dict[str, nn.Module] = {}  # raw modules, trainable and frozen
        self.wrapped: dict[str, nn.Module] = {}  # what forward runs on
        self.trainable: set[str] = set()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, StepSchedule] = {}
        self.specs: dict[str, OptimSpec] = {}
        self.losses: dict[str, list[Tensor]] = {}  # this step's losses per network, for the finite check

    # -- setup ------------------------------------------------------------------------------
    def setup(self, trainable: dict[str, nn.Module], optim: dict[str, OptimSpec], frozen: dict[str, nn.Module]) -> None:
        missing = set(trainable) - set(optim)
        if missing:
            raise ValueError(f"engine.setup: no OptimSpec for trainable network(s) {sorted(missing)}")
        clash = set(trainable) & set(frozen)
        if clash:
            raise ValueError(f"engine.setup: {sorted(clash)} named both trainable and frozen")
        for name, module in frozen.items():
            module.to(self.device).eval().requires_grad_(False)
            self.modules[name] = self.wrapped[name] = module
        for name, module in trainable.items():
            module.to(self.device).train()
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"engine.setup: trainable network {name!r} has no parameter with requires_grad")
            self.modules[name] = module
            self.wrapped[name] = self._wrap(name, module)
            self.trainable.add(name)
            self.specs[name] = optim[name]
            self.optimizers[name] = self._make_optimizer(params, optim[name])
            self.schedules[name] = StepSchedule(optim[name])

    def _wrap(self, name: str, module: nn.Module) -> nn.Module:
        """Hook for subclasses (DDP); the local engine runs the module itself."""
        return module

    def _make_optimizer(self, params: list[nn.Parameter], spec: OptimSpec) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.wrapped:
            raise KeyError(f"engine has no network {name!r}; it has {sorted(self.wrapped)}")
        return self.wrapped[name]

    def __contains__(self, name: str) -> bool:
        return name in self.wrapped

    def raw(self, name: str) -> nn.Module:
        self[name]  # the KeyError naming what there is
        return self.modules[name]

    def _trainable(self, name: str) -> None:
        if name not in self.trainable:
            raise KeyError(f"{name!r} is not a trainable network of this engine (trainable: {sorted(self.trainable)})")

    # -- optimisation -----------------------------------------------------------------------
    def backward(self, name: str, loss: Tensor) -> None:
        self._trainable(name)
        self._record_loss(name, loss)
        loss.backward()

    def step(self, name: str) -> dict[str, float]:
        self._trainable(name)
        opt, spec = self.optimizers[name], self.specs[name]
        params = [p for group in opt.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        if self._refuse_update(name, grad_norm):  # the non-finite policy (engine/base.py)
            opt.zero_grad(set_to_none=True)
            return self._skipped(name, float(grad_norm))
        lr = self.schedules[name].apply(opt.param_groups)
        opt.step()
        self.schedules[name].advance()
        opt.zero_grad(set_to_none=True)
        self._applied(name)  # the generator EMA follows applied updates only (spec 6 #20)
        return {"grad_norm": float(grad_norm), "lr": lr}

    def zero_grad(self, name: str) -> None:
        self._trainable(name)
        self.losses.pop(name, None)
        self.optimizers[name].zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        """Parameters of the named networks stop collecting gradients; inputs still get theirs."""
        switched = [p for n in names for p in self.modules[n].parameters() if p.requires_grad]
        for p in switched:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in switched:
                p.requires_grad_(True)

    def ema_(self, target: str, source: str, decay: float) -> None:
        """target <- decay * target + (1 - decay) * source over the full replicas (spec 1.7, Eq. 11)."""
        common.ema_update_(self.modules[target], self.modules[source], decay)

    def _shadow(self, name: str, decay: float) -> Shadow:
        """Whole fp32 tensors; under DDP every replica's moves alike and rank 0 writes it."""
        self._trainable(name)
        return FullShadow(name, self.modules[name], decay, self.kind, self.rank, self.world_size)

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        return value

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Per trainable network: bytes of parameters, gradients and optimizer state (full replicas)."""
        return common.replica_memory(self.modules, self.optimizers)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, step_dir: Path) -> None:
        step_dir = Path(step_dir)
        step_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(self.trainable):
            state = checkpoint_state(self.modules[name])
            save_tensors(step_dir / f"{name}.safetensors", state)
            tensors, meta = self._optimizer_state(name)
            save_tensors(step_dir / f"{name}.optim.safetensors", tensors)
            save_json(step_dir / f"{name}.optim.json", meta)
            write_map(step_dir, name, self.kind, "full", self.world_size, {k: tensor_entry(v) for k, v in state.items()})

    def load(self, step_dir: Path) -> None:
        step_dir = Path(step_dir)
        for name in sorted(self.trainable):
            path = step_dir / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {step_dir} has no {path.name} for trainable network {name!r}")
            module = self.modules[name]
            state = load_file(str(path), device=str(self.device))
            expected = set(checkpoint_state(module))
            if set(state) != expected:
                raise ValueError(f"{path}: keys do not match network {name!r} "
                                 f"(first differences: {sorted(set(state) ^ expected)[:5]})")
            module.load_state_dict(state, strict=False)
            meta = load_json(step_dir / f"{name}.optim.json")
            tensors = load_file(str(step_dir / f"{name}.optim.safetensors"), device=str(self.device))
            self._load_optimizer_state(name, tensors, meta)

    def _param_names(self, name: str) -> list[str]:
        """Optimizer parameter order as names (safetensors keys must be strings)."""
        by_id = {id(p): n for n, p in self.modules[name].named_parameters()}
        return [by_id[id(p)] for group in self.optimizers[name].param_groups for p in group["params"]]

    def _optimizer_state(self, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        state = self.optimizers[name].state_dict()
        names = self._param_names(name)
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"{names[idx]}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(names[idx], {})[key] = value
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[i] for i in g["params"]]}
                  for g in state["param_groups"]]
        return tensors, {"param_groups": groups, "scalars": scalars, "schedule": self.schedules[name].state_dict()}

    def _load_optimizer_state(self, name: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        names = self._param_names(name)
        index = {n: i for i, n in enumerate(names)}
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            pname, _, skey = key.rpartition(".")
            state.setdefault(index[pname], {})[skey] = value
        for pname, entry in meta["scalars"].items():
            state.setdefault(index[pname], {}).update(entry)
        groups = [g | {"params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
        self.optimizers[name].load_state_dict({"state": state, "param_groups": groups})
        self.schedules[name].load_state_dict(meta["schedule"])

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        return {k: v.detach().clone().cpu() for k, v in self.modules[name].state_dict().items()}
