"""FSDP2 engine: ``fully_shard`` per block and per network, checkpoints through
torch.distributed.checkpoint in safetensors.

Each trainable network (generator, fake score, discriminator) is sharded block by block
(``common.block_modules``) and then as a root, over all ranks, with its own AdamW and
schedule. Frozen networks are replicated, except the teacher (and stage-2 reference) when
``teacher_sharding="zero3"``: then they are sharded the same way and only all-gathered for
inference. A loss that flows through a frozen-for-this-step network (the generator's GAN
loss through the discriminator and the VAE decoder) is ordinary autograd: the discriminator's
blocks are all-gathered in backward, and ``frozen`` keeps its parameters from collecting
gradients. A network built on the meta device (``flashdmd.nets.lazy``) is sharded before it
has storage; each rank then allocates and reads only its own rows from the weight files.

Departures from FastVideo/FastGen (anchors_dmd_code.md): checkpoints use DCP's Hugging Face
safetensors storage (no pickled ``.metadata``) with optimizer hyper-parameters in JSON, and
frozen tensors are never saved (``ignore_frozen_params``). Each chunk's offsets sit in its
file's header, so ``dcp.load`` re-shards a step directory written at any world size, and
``<name>.map.json`` (layout ``dcp``) names the global shapes for single-process readers
(flashdmd.engine.checkpoint_reader).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from flashdmd.engine import common
from flashdmd.engine.base import Engine, OptimSpec
from flashdmd.engine.checkpoint_map import tensor_entry, write_map
from flashdmd.engine.lr import StepSchedule
from flashdmd.engine.shadow_dcp import DTensorShadow, reshard_all
from flashdmd.engine.state_io import join_optimizer_state, load_json, save_json, split_optimizer_state
from flashdmd.nets.lazy import fill_dtensor_shards, remember_memory_tensors, source_of

SHARDED_FROZEN = ("teacher", "reference")  # the frozen networks teacher_sharding applies to
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_shards(name: str, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's shards of two parameters for the EMA; they must be sharded alike."""
    if isinstance(p, DTensor) != isinstance(q, DTensor) or (
        isinstance(p, DTensor) and (p.placements != q.placements or not torch.equal(p.device_mesh.mesh, q.device_mesh.mesh))
    ):
        raise RuntimeError(f"EMA: the two networks' {name} are sharded differently")
    return _local(p), _local(q)


class FSDPEngine(Engine):
    """Trainable networks under FSDP2 on the default process group (which must be initialised)."""

    def __init__(
        self,
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
        offload: bool = False,
        teacher_sharding: str = "replicate",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("FSDPEngine needs an initialised process group (torch.distributed.init_process_group)")
        if precision not in _DTYPES:
            raise ValueError(f"engine.precision must be one of {list(_DTYPES)}, got {precision!r}")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # fp32 master weights always; on CPU compute stays fp32 (precision policy).
        compute = _DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.compute_dtype = compute
        self.mp_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        self.offload_policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else None
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))  # one mesh: identical sharding per shape
        self.gradient_checkpointing = gradient_checkpointing
        self.teacher_sharding = teacher_sharding
        self.trainable: dict[str, nn.Module] = {}
        self.frozen_nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, StepSchedule] = {}
        self.losses: dict[str, list[Tensor]] = {}  # this step's losses per network, for the finite check
        self.specs: dict[str, OptimSpec] = {}

    # ---------------------------------------------------------------- placement
    def _shard(self, module: nn.Module) -> nn.Module:
        lazy = source_of(module)
        if lazy is None:
            module.to(self.device)
            common.broadcast_from_rank0(module)
        else:  # built on the meta device: shard first, then allocate and read only this rank's rows
            remember_memory_tensors(module, lazy)
        # Roots too reshard after forward: a no-grad forward (the fake score inside the DMD
        # target) must leave the parameters sharded for the EMA pull and the memory budget.
        kwargs = {"mesh": self.mesh, "mp_policy": self.mp_policy, "reshard_after_forward": True}
        if self.offload_policy is not None:
            kwargs["offload_policy"] = self.offload_policy
        for block in common.block_modules(module):
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        if lazy is not None:
            module.to_empty(device="cpu" if self.offload_policy is not None else self.device)
            fill_dtensor_shards(module, lazy)
        return module

    def setup(self, trainable: dict[str, nn.Module], optim: dict[str, OptimSpec], frozen: dict[str, nn.Module]) -> None:
        if set(trainable) != set(optim):
            raise ValueError(f"one OptimSpec per trainable network: networks {sorted(trainable)}, specs {sorted(optim)}")
        for name, module in trainable.items():
            if self.gradient_checkpointing:
                common.enable_gradient_checkpointing(module)
            self.trainable[name] = self._shard(module.train())
            spec = optim[name]
            params = [p for _, p in common.trainable_parameters(module)]
            if not params:
                raise ValueError(f"trainable network '{name}' has no parameter with requires_grad")
            self.optimizers[name] = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
            self.schedules[name] = StepSchedule(spec)
            self.specs[name] = spec
        for name, module in frozen.items():
            module.requires_grad_(False).eval()
            if self.teacher_sharding == "zero3" and name in SHARDED_FROZEN:
                self._shard(module)
            else:
                module.to(self.device)
            self.frozen_nets[name] = module

    def __getitem__(self, name: str) -> nn.Module:
        if name in self.trainable:
            return self.trainable[name]
        if name in self.frozen_nets:
            return self.frozen_nets[name]
        raise KeyError(f"no network '{name}' in the engine; have {sorted(self.trainable) + sorted(self.frozen_nets)}")

    def raw(self, name: str) -> nn.Module:
        return self[name]  # fully_shard changes modules in place: the network itself

    # ---------------------------------------------------------------- training
    def backward(self, name: str, loss: Tensor) -> None:
        self._trainable(name)
        self._record_loss(name, loss)
        loss.backward()

    def step(self, name: str) -> dict[str, float]:
        module, opt, schedule = self._trainable(name), self.optimizers[name], self.schedules[name]
        params = [p for _, p in common.trainable_parameters(module)]
        norm = torch.nn.utils.clip_grad_norm_(params, self.specs[name].grad_clip)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if self._refuse_update(name, norm):  # the non-finite policy (engine/base.py)
            opt.zero_grad(set_to_none=True)
            return self._skipped(name, float(norm))
        lr = schedule.apply(opt.param_groups)
        opt.step()
        schedule.advance()
        opt.zero_grad(set_to_none=True)
        self._applied(name)  # the generator EMA follows applied updates only (spec 6 #20)
        return {"grad_norm": float(norm), "lr": lr}

    def zero_grad(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        with common.no_grad_collection(self._trainable(n) for n in names):
            yield

    @torch.no_grad()
    def ema_(self, target: str, source: str, decay: float) -> None:
        reshard_all(self._trainable(target))
        reshard_all(self._trainable(source))
        common.ema_update_(self._trainable(target), self._trainable(source), decay, shards=_local_shards)

    def _shadow(self, name: str, decay: float) -> DTensorShadow:
        """The generator EMA as DTensors sharded like the parameters (flashdmd.engine.shadow_dcp)."""
        return DTensorShadow(name, self._trainable(name), decay, _local_shards)

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        return common.all_reduce_mean(value, self.device)

    # ---------------------------------------------------------------- state
    def _state(self, name: str) -> tuple[dict[str, Tensor], dict]:
        module, opt = self.trainable[name], self.optimizers[name]
        model_sd = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=True))
        tensors, meta = split_optimizer_state(get_optimizer_state_dict(module, opt))
        state = {f"model.{k}": v for k, v in model_sd.items()}
        state.update({f"optim.{k}": v for k, v in tensors.items()})
        return state, meta

    def save(self, step_dir: Path) -> None:
        for name in self.trainable:
            folder = Path(step_dir) / name
            state, meta = self._state(name)
            dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
            if self.rank == 0:
                save_json(folder / "optim.json", meta)
                save_json(folder / "schedule.json", self.schedules[name].state_dict())
                model = {k[len("model."):]: tensor_entry(v) for k, v in state.items() if k.startswith("model.")}
                write_map(step_dir, name, "fsdp", "dcp", self.world_size, model)
        dist.barrier()

    def load(self, step_dir: Path) -> None:
        for name, module in self.trainable.items():
            folder = Path(step_dir) / name
            meta = load_json(folder / "optim.json")
            state, _ = self._state(name)
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
            model_sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            optim_t = {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")}
            set_model_state_dict(module, model_sd, options=StateDictOptions(ignore_frozen_params=True, strict=False))
            set_optimizer_state_dict(module, self.optimizers[name], join_optimizer_state(optim_t, meta, int_keys=False))
            self.schedules[name].load_state_dict(load_json(folder / "schedule.json"))
        dist.barrier()

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self._trainable(name), options=options)

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Per trainable network, this rank's bytes of parameters (all local shards), gradients
        (one fp32 shard per trainable parameter, what a backward holds) and optimizer state."""
        report = {}
        for name, module in self.trainable.items():
            opt = self.optimizers[name]
            trainable = [_local(p) for _, p in common.trainable_parameters(module)]
            report[name] = {
                "params": common.nbytes(_local(p) for p in module.parameters()),
                "grads": sum(t.numel() * 4 for t in trainable),
                "optimizer": common.nbytes(_local(v) for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)),
            }
        return report

    def _trainable(self, name: str) -> nn.Module:
        if name not in self.trainable:
            raise KeyError(f"'{name}' is not a trainable network of the engine; have {sorted(self.trainable)}")
        return self.trainable[name]
