"""Denoiser adapter for diffusers' SD3Transformer2DModel (SD3-Medium's MMDiT).

``MMDiTDenoiser(x_t, t, cond)`` returns the flow velocity ``eps - x0`` (the rectified-flow
schedule's native prediction); ``t = 1000 sigma`` is passed to the transformer unchanged, as
diffusers' StableDiffusion3Pipeline does. Conditioning keys: ``encoder_hidden_states``
(B, 77 + L_t5, 4096) — CLIP-L and bigG penultimate states concatenated, zero-padded to the T5
width, followed by the T5 states (zeros when T5 is left out, as in diffusers); ``pooled``
(B, 2048) — both CLIP projected EOS embeddings concatenated.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flashdmd.nets.denoiser import DiffusersDenoiser
from flashdmd.nets.interfaces import Conditioning


class MMDiTDenoiser(DiffusersDenoiser):
    def model_inputs(self, x_t: Tensor, t: Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        return {"hidden_states": x_t, "timestep": t, "encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
                "pooled_projections": cond["pooled"].to(dtype)}
