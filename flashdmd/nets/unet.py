"""Denoiser adapter for diffusers' UNet2DConditionModel: SD1.5 (text) and SDXL (text + added conds).

``UNetDenoiser(x_t, t, cond)`` returns the UNet output, which is the schedule's native
parameterisation (epsilon, or v for v-prediction checkpoints). Conditioning keys:

- SD1.5: ``encoder_hidden_states`` (B, 77, 768) — the CLIP-L last hidden state.
- SDXL: ``encoder_hidden_states`` (B, 77, 2048) — penultimate states of CLIP-L and bigG
  concatenated; ``pooled`` (B, 1280) — bigG's projected EOS embedding; ``time_ids`` (B, 6) —
  original size, crop top-left, target size (SDXL's micro-conditioning).

Keys the UNet does not read (e.g. the reward model's token ids) are ignored, so one
Conditioning serves every network.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flashdmd.diffusion.schedules import Schedule
from flashdmd.nets.denoiser import DiffusersDenoiser
from flashdmd.nets.interfaces import Conditioning


class UNetDenoiser(DiffusersDenoiser):
    def __init__(self, unet: nn.Module, schedule: Schedule, added_conds: bool) -> None:
        super().__init__(unet, schedule)
        self.added_conds = added_conds

    def model_inputs(self, x_t: Tensor, t: Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"sample": x_t, "timestep": t,
                                  "encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
        if self.added_conds:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(dtype),
                                           "time_ids": cond["time_ids"].to(dtype)}
        return kwargs
