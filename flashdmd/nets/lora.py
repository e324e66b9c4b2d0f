"""LoRA on the generator and the fake score (spec 1.1: SD3-Medium is distilled with LoRA).

``add_lora`` freezes a denoiser's base weights and attaches one PEFT LoRA adapter through the
diffusers adapter API (``model.add_adapter``). The generator and the fake score are separate
copies of the teacher, each with its own adapter; both use the same adapter name so that their
trainable parameters have identical names, which is what makes the Algorithm 1 EMA pull
(fake score <- EMA(generator)) a name-by-name update over the adapter weights only (the
engines' one EMA, ``flashdmd.engine.common.ema_update_``, pulls the tensors that require grad).
LoRA-B starts at zero, so at initialisation both equal the teacher exactly.
"""
from __future__ import annotations

from torch import nn

from flashdmd.config import LoraConfig

ADAPTER = "flashdmd"


def add_lora(denoiser: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze ``denoiser.model`` and attach a trainable LoRA adapter to its ``cfg.target_modules``."""
    from peft import LoraConfig as PeftLoraConfig

    model = denoiser.model
    model.requires_grad_(False)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    names = {name for name, _ in model.named_modules()}
    unknown = [t for t in cfg.target_modules if t not in present and not any(n.endswith("." + t) for n in names)]
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown} match no module of {type(model).__name__}")
    model.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                     init_lora_weights=True), adapter_name=ADAPTER)
    model.set_adapter(ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(f".{ADAPTER}." in name)
    return denoiser


def trainable_named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}

