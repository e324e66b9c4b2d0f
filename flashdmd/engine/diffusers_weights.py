"""Full weights of a trained network, from any engine, in the diffusers ``save_pretrained`` layout.

``export_full_weights`` consolidates a trainable network (the generator; the fake score on
request) from whatever engine holds it, collective on every rank, and rank 0 writes a folder
that ``UNet2DConditionModel.from_pretrained`` / ``SD3Transformer2DModel.from_pretrained`` load.
The family adapters (UNetDenoiser, MMDiTDenoiser) wrap the diffusers model; the export takes
the diffusers model inside and drops the adapter's key prefix. With LoRA the adapter weights
are fused into the base weights, so the export is a plain model. For DeepSpeed the weights are
the fp32 masters, the same numbers as DeepSpeed's zero_to_fp32 (tests/engine/test_engine_sharded.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flashdmd.engine.base import Engine
from flashdmd.engine.state_io import umask_modes


def _unwrap(module: nn.Module) -> nn.Module:
    """The raw network under DDP / DeepSpeed wrappers (FSDP2 shards in place, no wrapper)."""
    while type(module).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") and hasattr(module, "module"):
        module = module.module
    return module


def find_diffusers_model(module: nn.Module) -> tuple[str, nn.Module]:
    """(key prefix, model): the outermost diffusers ModelMixin inside ``module``."""
    from diffusers import ModelMixin

    for name, sub in _unwrap(module).named_modules():
        if isinstance(sub, ModelMixin):
            return (f"{name}." if name else ""), sub
    raise TypeError(f"{type(module).__name__} contains no diffusers model to export (expected a family adapter)")


def export_full_weights(engine: Engine, name: str, out_dir: Path | str, dtype: torch.dtype | None = None) -> Path | None:
    """Collective: write network ``name`` in diffusers layout to ``out_dir`` on rank 0.

    Returns the folder on rank 0 and None elsewhere. ``dtype`` casts the saved weights (default:
    as trained, fp32 masters)."""
    prefix, model = find_diffusers_model(engine[name])
    full = engine.full_state_dict(name)
    if engine.rank != 0:
        return None
    weights: dict[str, Tensor] = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"full_state_dict('{name}') has no keys under '{prefix}'; cannot export")
    fresh = type(model).from_config(model.config)
    adapters = dict(getattr(model, "peft_config", {}) or {})
    for adapter, config in adapters.items():
        fresh.add_adapter(config, adapter_name=adapter)
    fresh.load_state_dict(weights, strict=True)
    if adapters:
        fresh.fuse_lora(lora_scale=1.0)
        fresh.unload_lora()
    if dtype is not None:
        fresh.to(dtype)
    out = Path(out_dir)
    fresh.save_pretrained(out, safe_serialization=True)
    umask_modes(out)
    return out
