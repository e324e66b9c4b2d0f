"""DeepSpeed ZeRO-3 engine: one DeepSpeed engine per trainable network, all on the default
process group (anchors_jobsystem.md 1.4-1.5).

- Trainable networks (generator, fake score, discriminator heads with a frozen backbone):
  ``deepspeed.initialize`` each with ZeRO stage 3, a client ``torch.optim.AdamW`` (or, with
  ``offload_optimizer``, DeepSpeed's CPU AdamW, which g++ compiles on first use), fp32 master
  weights and DeepSpeed's gradient clipping. Our ``StepSchedule`` writes the learning rate.
  A network built on the meta device (``flashdmd.nets.lazy``) is rebuilt under
  ``deepspeed.zero.Init`` and each rank reads its own flat range of every tensor from the files.
- Frozen networks: replicated plain modules, except the teacher/reference with
  ``teacher_sharding="zero3"``: a ZeRO-3 inference engine (no optimizer) that all-gathers its
  blocks on the fly, as DeepSpeed-Chat's reference model.
- The generator's GAN loss goes through the discriminator's engine and the frozen decoder:
  inside ``frozen("discriminator")`` the discriminator's parameters stop requiring gradients,
  so ZeRO-3 fetches them for backward but reduces nothing into its buckets (DeepSpeed #4923,
  #399; tested in tests/test_engine_deepspeed.py).
- EMA (spec 1.7): on the local fp32 master partitions and the local bit16 partitions, no
  gathering; identical architectures partition identically, which is asserted per tensor.
- Checkpoints: each rank writes its optimizer partition (fp32 master flat groups and Adam
  moments) to ``<name>/rank<r>.safetensors`` plus JSON, rank 0 the buffers and the map
  ``<name>.map.json`` (layout ``zero3``: every parameter's sub-group, offset and partition size,
  flashdmd.engine.checkpoint_map). Loading rebuilds this rank's partitions from the map, so a step
  directory resumes at any world size. With ``native_layout`` DeepSpeed's own ``save_checkpoint``
  also writes its standard layout into ``<name>/`` (``latest``, ``ds/mp_rank_00_model_states.pt``,
  ``ds/zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, ``zero_to_fp32.py``) for DeepSpeed's tools
  (zero_to_fp32, ds_to_universal). Those files are pickles for DeepSpeed to read; flashdmd never
  reads them.
- Full weights (export): fp32 masters all-gathered tensor by tensor, the same numbers
  DeepSpeed's zero_to_fp32 consolidation produces.

Not covered: fp16 loss-scaler state is not checkpointed (bf16 and fp32 need none), NVMe
offload.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from flashdmd.engine import common
from flashdmd.engine.base import Engine, OptimSpec
from flashdmd.engine.checkpoint_map import tensor_entry, write_map, zero3_entries, zero3_local_slice
from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.engine.lr import StepSchedule
from flashdmd.engine.state_io import join_optimizer_state, load_json, save_json, save_tensors, split_optimizer_state
from flashdmd.nets.lazy import LazyNet, fill_zero3_partitions, remember_memory_tensors, source_of

# DeepSpeed picks its accelerator when imported; say which one instead of letting it probe.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_local_fp32_param

from flashdmd.engine.shadow_zero3 import Zero3Shadow  # imports DeepSpeed: after its accelerator is set

SHARDED_FROZEN = ("teacher", "reference")
NATIVE_TAG = "ds"  # the tag of DeepSpeed's own checkpoint inside <step>/<name>/
log = logging.getLogger("flashdmd.engine")


def _master_partitions(name: str, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's fp32 master partitions of two ZeRO-3 parameters, for the EMA."""
    if p.ds_tensor.numel() != q.ds_tensor.numel() or p.ds_numel != q.ds_numel:
        raise RuntimeError(f"EMA: the two networks' {name} are partitioned differently")
    return safe_get_local_fp32_param(p), safe_get_local_fp32_param(q)


def _store_master(p: Tensor, master: Tensor) -> None:
    """Write an updated fp32 master partition and the bit16 partition the forward gathers."""
    safe_set_local_fp32_param(p, master)
    p.ds_tensor.copy_(master.to(p.ds_tensor.dtype))


class DeepSpeedEngine(Engine):
    """Trainable networks under ZeRO-3 on the default process group (which must be initialised)."""

    def __init__(
        self,
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        teacher_sharding: str = "replicate",
        native_layout: bool = True,
        micro_batch: int = 1,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs an initialised process group (torch.distributed.init_process_group)")
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # fp32 master weights always; bf16/fp16 compute only where there is a GPU.
        self.precision = precision if self.device.type == "cuda" else "fp32"
        self.compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.gradient_checkpointing = gradient_checkpointing
        self.offload_optimizer, self.offload_params = offload_optimizer, offload_params
        self.teacher_sharding = teacher_sharding
        self.native_layout = native_layout
        self.micro_batch = micro_batch
        self.engines: dict[str, Any] = {}
        self.frozen_nets: dict[str, nn.Module] = {}
        self.schedules: dict[str, StepSchedule] = {}
        self.specs: dict[str, OptimSpec] = {}
        self.losses: dict[str, list[Tensor]] = {}  # this step's losses per network, for the finite check

    # ---------------------------------------------------------------- placement
    def _config(self, spec: OptimSpec | None) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        config: dict[str, Any] = {
            # required by DeepSpeed's checks; batching is ours: the largest per-rank share of the global
            # batch (ranks may differ by one, spec 1.9), which DeepSpeed only uses for its throughput logs
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "steps_per_print": 2**31 - 1,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
        }
        if spec is not None:
            config["gradient_clipping"] = spec.grad_clip
            if self.offload_optimizer:
                zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
                config["optimizer"] = {
                    "type": "AdamW",
                    "params": {"lr": spec.lr, "betas": list(spec.betas), "weight_decay": spec.weight_decay},
                }
        return config

    def _build_partitioned(self, meta: nn.Module, lazy: LazyNet, spec: OptimSpec | None) -> nn.Module:
        """A meta-built network rebuilt under zero.Init (each module partitioned as it is
        constructed), then each rank reads its own flat range of every tensor from the files;
        the tensors no file holds (LoRA adapters) take rank 0's values from the meta build."""
        remember_memory_tensors(meta, lazy)
        with deepspeed.zero.Init(config_dict_or_path=self._config(spec),
                                 remote_device="cpu" if self.offload_params else None):
            module = lazy.build()
        missing = fill_zero3_partitions(module, lazy.weights, self.rank)
        unknown = sorted(set(missing) - set(lazy.memory))
        if unknown:
            raise KeyError(f"the weights folder has no tensor for {unknown[:3]}")
        if missing:
            with deepspeed.zero.GatheredParameters(list(missing.values()), modifier_rank=0), torch.no_grad():
                for name, param in missing.items():
                    param.copy_(lazy.memory[name])
        lazy.memory = {}
        return module

    def setup(self, trainable: dict[str, nn.Module], optim: dict[str, OptimSpec], frozen: dict[str, nn.Module]) -> None:
        if set(trainable) != set(optim):
            raise ValueError(f"one OptimSpec per trainable network: networks {sorted(trainable)}, specs {sorted(optim)}")
        for name, module in trainable.items():
            spec = optim[name]
            lazy = source_of(module)
            if lazy is not None:
                module = self._build_partitioned(module, lazy, spec)
            if self.gradient_checkpointing:
                common.enable_gradient_checkpointing(module)
            params = [p for _, p in common.trainable_parameters(module)]
            if not params:
                raise ValueError(f"trainable network '{name}' has no parameter with requires_grad")
            if lazy is None:
                module.to(self.device)
                common.broadcast_from_rank0(module)
            client_opt = None
            if not self.offload_optimizer:
                client_opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
            engine, *_ = deepspeed.initialize(
                model=module.train(),
                model_parameters=params,
                optimizer=client_opt,
                config=self._config(spec),
                dist_init_required=False,
            )
            self.engines[name] = engine
            self.schedules[name] = StepSchedule(spec)
            self.specs[name] = spec
        for name, module in frozen.items():
            module.requires_grad_(False).eval()
            if self.teacher_sharding == "zero3" and name in SHARDED_FROZEN:
                lazy = source_of(module)
                if lazy is None:
                    common.broadcast_from_rank0(module.to(self.device))
                else:  # meta-built: partitioned as constructed, each rank reads only its ranges
                    module = self._build_partitioned(module, lazy, None).requires_grad_(False).eval()
                engine, *_ = deepspeed.initialize(model=module, config=self._config(None), dist_init_required=False)
                engine.eval()
                self.frozen_nets[name] = engine
            else:
                self.frozen_nets[name] = module.to(self.device)

    def __getitem__(self, name: str) -> nn.Module:
        if name in self.engines:
            return self.engines[name]
        if name in self.frozen_nets:
            return self.frozen_nets[name]
        raise KeyError(f"no network '{name}' in the engine; have {sorted(self.engines) + sorted(self.frozen_nets)}")

    def raw(self, name: str) -> nn.Module:
        """The module inside the DeepSpeed engine (rebuilt under zero.Init for a meta-built network)."""
        net = self[name]
        return net.module if isinstance(net, deepspeed.DeepSpeedEngine) else net

    def _engine(self, name: str) -> Any:
        if name not in self.engines:
            raise KeyError(f"'{name}' is not a trainable network of the engine; have {sorted(self.engines)}")
        return self.engines[name]

    # ---------------------------------------------------------------- training
    def backward(self, name: str, loss: Tensor) -> None:
        self._record_loss(name, loss)
        self._engine(name).backward(loss)


    def step(self, name: str) -> dict[str, float]:
        """The non-finite policy (engine/base.py) in two checks, as ZeRO-3 holds the gradient
        norm only inside its step: a non-finite loss on any rank skips ``engine.step`` (zero_grad
        resets ZeRO-3's micro-step, so the next backward overwrites the partitioned gradients
        instead of adding to them); a non-finite global norm, all-reduced by DeepSpeed itself,
        makes its step discard the update (its overflow path, taken for every dtype)."""
        engine, schedule = self._engine(name), self.schedules[name]
        if self._refuse_update(name):
            engine.optimizer.zero_grad(set_to_none=True)
            return self._skipped(name, float("nan"))
        lr = schedule.apply(engine.optimizer.param_groups)
        engine.step()
        engine.optimizer.zero_grad(set_to_none=True)
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if engine.optimizer.overflow:
            return self._skipped(name, norm)
        schedule.advance()
        self._applied(name)  # the generator EMA follows applied updates only (spec 6 #20)
        return {"grad_norm": norm, "lr": lr}

    def zero_grad(self, name: str) -> None:
        self.losses.pop(name, None)
        self._engine(name).optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        with common.no_grad_collection(self._engine(n).module for n in names):
            yield

    def ema_(self, target: str, source: str, decay: float) -> None:
        common.ema_update_(self._engine(target).module, self._engine(source).module, decay,
                           shards=_master_partitions, store=_store_master)

    def _shadow(self, name: str, decay: float) -> Zero3Shadow:
        """The generator EMA on this rank's fp32 master pieces (flashdmd.engine.shadow_zero3)."""
        engine = self._engine(name)
        return Zero3Shadow(name, engine.module, decay, engine.optimizer.fp16_groups)

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        return common.all_reduce_mean(value, self.device)

    # ---------------------------------------------------------------- state
    def save(self, step_dir: Path) -> None:
        for name, engine in self.engines.items():
            folder = Path(step_dir) / name
            opt = engine.optimizer
            state = opt.state_dict()  # this rank's partitions (ZeRO-3 rigid state dict)
            tensors, meta = split_optimizer_state(state["optimizer_state_dict"])
            tensors.update({f"fp32.{i}": t for i, t in enumerate(state["fp32_flat_groups"])})
            save_tensors(folder / f"rank{self.rank:05d}.safetensors", tensors)
            save_json(folder / f"rank{self.rank:05d}.json", meta)
            if self.native_layout:
                engine.save_checkpoint(str(folder), tag=NATIVE_TAG)
            if self.rank == 0:
                save_json(folder / "schedule.json", self.schedules[name].state_dict())
                buffers = {k: b for k, b in engine.module.named_buffers()}
                save_tensors(folder / "buffers.safetensors", buffers)
                entries = zero3_entries(engine.module, opt.fp16_groups)
                entries.update({k: tensor_entry(b) for k, b in buffers.items()})
                write_map(step_dir, name, "deepspeed", "zero3", self.world_size, entries)
        dist.barrier()

    def load(self, step_dir: Path) -> None:
        reader = CheckpointReader(step_dir)
        for name, engine in self.engines.items():
            saved = reader.map(name)["world_size"]
            if saved != self.world_size and self.rank == 0:
                log.info("%s: re-partitioning ZeRO-3 state written by %d ranks for %d ranks", name, saved, self.world_size)
            opt = engine.optimizer
            # DeepSpeed's own loader restores the Adam moments, the fp32 masters and, from them,
            # the bit16 partitions the forward gathers; the partitions come from the map.
            opt._rigid_load_state_dict(
                {
                    "loss_scaler": opt.loss_scaler,
                    "dynamic_loss_scale": opt.dynamic_loss_scale,
                    "overflow": False,
                    **self._partitions(reader, name),
                },
                load_optimizer_states=True,
            )
            self.schedules[name].load_state_dict(load_json(Path(step_dir) / name / "schedule.json"))
        dist.barrier()

    def _partitions(self, reader: CheckpointReader, name: str) -> dict[str, Any]:
        """This rank's flat fp32 partitions and optimizer state of ``name``, cut out of the full
        tensors of a step directory written at any world size (ZeRO-3's partition rule)."""
        engine = self._engine(name)
        opt, folder = engine.optimizer, reader.folder / name
        names = {id(p): n for n, p in engine.module.named_parameters()}
        groups = [[names[id(p)] for p in params] for params in opt.fp16_groups]
        saved = {k: e["group"] for k, e in reader.map(name)["tensors"].items() if "group" in e}
        mine = {n: g for g, params in enumerate(groups) for n in params}
        if saved != mine:
            raise ValueError(f"{folder}: the checkpoint's parameters or ZeRO-3 sub-groups do not match network {name!r} "
                             f"(e.g. {sorted(saved.keys() ^ mine.keys())[:5]}); model.family or model.lora differ "
                             "from the run that wrote it")
        meta = load_json(folder / "rank00000.json")
        with safe_open(str(folder / "rank00000.safetensors"), "pt") as f:
            scalars = {k: f.get_tensor(k) for k in f.keys() if k.startswith("state.") and not f.get_slice(k).get_shape()}
            moments = sorted({k.split(".")[2] for k in f.keys() if k.startswith("state.") and f.get_slice(k).get_shape()})

        def flat(read: Any) -> list[Tensor]:
            return [torch.cat([zero3_local_slice(read(n).reshape(-1).float(), self.rank, self.world_size) for n in g])
                    for g in groups]

        fp32 = flat(lambda n: reader.tensor(name, n))
        for i, t in enumerate(fp32):
            if t.numel() != opt.fp32_partitioned_groups_flat[i].numel():
                raise ValueError(f"{folder}: sub-group {i} re-partitions to {t.numel()} elements, the engine holds "
                                 f"{opt.fp32_partitioned_groups_flat[i].numel()}")
        tensors = dict(scalars)
        for m in moments:
            tensors.update({f"state.{i}.{m}": t for i, t in enumerate(flat(lambda n: reader.optimizer_tensor(name, n, m)))})
        return {"optimizer_state_dict": join_optimizer_state(tensors, meta, int_keys=True), "fp32_flat_groups": fp32}

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        """fp32 masters of trainable tensors, gathered bit16 values of frozen ones, buffers as held."""
        module = self._engine(name).module
        out: dict[str, Tensor] = {}
        for key, p in module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
            else:
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            if self.rank == 0:
                out[key] = full.detach().to("cpu", torch.float32, copy=True)
        if self.rank == 0:
            out.update({k: b.detach().to("cpu", copy=True) for k, b in module.named_buffers()})
        return out

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Per trainable network, this rank's bytes of parameter partitions, gradient partitions
        and optimizer state (Adam moments plus the fp32 master partitions)."""
        report = {}
        for name, engine in self.engines.items():
            opt = engine.optimizer
            inner = [v for s in opt.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
            grads = getattr(opt, "grad_partitions_flat_buffer", None)
            report[name] = {
                "params": common.nbytes(p.ds_tensor for p in engine.module.parameters()),
                "grads": common.nbytes([grads]) if grads is not None else common.nbytes(opt.fp32_partitioned_groups_flat),
                "optimizer": common.nbytes(inner) + common.nbytes(opt.fp32_partitioned_groups_flat),
            }
        return report
