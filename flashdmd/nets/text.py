"""Prompt -> Conditioning for each family, matching what the diffusers pipelines feed their denoisers.

- SD1.5: CLIP-L last hidden state (StableDiffusionPipeline without clip_skip).
- SDXL: penultimate hidden states of CLIP-L and bigG concatenated, bigG's projected EOS embedding
  as ``pooled`` and ``time_ids`` = (H, W, 0, 0, H, W) for the training resolution
  (StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids with default sizes).
- SD3: CLIP-L and bigG penultimate states concatenated, zero-padded to the T5 width and followed
  by T5's states (zeros when T5 is left out), ``pooled`` = both projected EOS embeddings.

Null (unconditional) conditioning for CFG is the empty prompt, except for SDXL folders that set
``force_zeros_for_empty_prompt`` (the pipeline's default, used when model_index.json is silent): there
it is all zeros, as StableDiffusionXLPipeline does.
Encoding runs frozen, under no_grad, in chunks of ``batch_size`` prompts. ``precomputed`` checks
and returns embeddings stored by the data tools, so training can skip the text encoders.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flashdmd.nets.interfaces import Conditioning, cat_cond

COND_KEYS = {
    "sd15": ("encoder_hidden_states",),
    "sdxl": ("encoder_hidden_states", "pooled", "time_ids"),
    "sd3": ("encoder_hidden_states", "pooled"),
}


class PromptEncoder(nn.Module):
    """Frozen text encoders of one family; ``encoder(prompts)`` -> Conditioning on the encoders' device."""

    def __init__(self, kind: str, text_encoders: list[nn.Module], tokenizers: list[Any], resolution: int,
                 force_zeros_for_empty_prompt: bool = False, t5: nn.Module | None = None, t5_tokenizer: Any = None,
                 t5_length: int = 256, joint_dim: int = 4096, batch_size: int = 64) -> None:
        super().__init__()
        if kind not in COND_KEYS:
            raise ValueError(f"unknown family kind {kind!r}")
        self.kind = kind
        self.encoders = nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.t5_length = t5_length
        self.joint_dim = joint_dim
        self.resolution = resolution
        self.force_zeros = force_zeros_for_empty_prompt and kind == "sdxl"
        self.batch_size = batch_size
        self.requires_grad_(False)
        self.eval()
        self._null: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    def _ids(self, tokenizer: Any, prompts: list[str], length: int | None = None) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(penultimate hidden states, projected EOS embedding) of CLIP encoder ``index``."""
        out = self.encoders[index](self._ids(self.tokenizers[index], prompts), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _encode_chunk(self, prompts: list[str]) -> Conditioning:
        n = len(prompts)
        if self.kind == "sd15":
            return {"encoder_hidden_states": self.encoders[0](self._ids(self.tokenizers[0], prompts))[0]}
        (h1, pooled1), (h2, pooled2) = self._clip(0, prompts), self._clip(1, prompts)
        if self.kind == "sdxl":
            return {"encoder_hidden_states": torch.cat([h1, h2], dim=-1), "pooled": pooled2,
                    "time_ids": self.time_ids(n).to(h1.dtype)}
        clip = torch.cat([h1, h2], dim=-1)
        if self.t5 is not None:
            t5 = self.t5(self._ids(self.t5_tokenizer, prompts, self.t5_length))[0].to(clip.dtype)
        else:
            t5 = clip.new_zeros(n, self.t5_length, self.joint_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([pooled1, pooled2], dim=-1)}

    def time_ids(self, n: int) -> Tensor:
        """SDXL micro-conditioning: original size, crop top-left (0, 0), target size."""
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).repeat(n, 1)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode_prompts takes a non-empty list of strings")
        chunks = [self._encode_chunk(list(prompts[i:i + self.batch_size]))
                  for i in range(0, len(prompts), self.batch_size)]
        return cat_cond(*chunks)

    @torch.no_grad()
    def null(self, n: int) -> Conditioning:
        """Unconditional conditioning for CFG, batch ``n`` (computed once, then repeated)."""
        if self._null is None or next(iter(self._null.values())).device != self.device:
            one = self([""])
            if self.force_zeros:
                one = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in one.items()}
            self._null = one
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self._null.items()}

    def precomputed(self, tensors: dict[str, Tensor]) -> Conditioning:
        """Validate stored embeddings (e.g. from latent shards) and return them as Conditioning."""
        keys = COND_KEYS[self.kind]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"precomputed conditioning for {self.kind} lacks {missing}; expected keys {list(keys)}")
        reference = self.null(1)
        for k in keys:
            if tensors[k].shape[1:] != reference[k].shape[1:]:
                raise ValueError(f"precomputed '{k}' has per-sample shape {tuple(tensors[k].shape[1:])}, the text "
                                 f"encoders give {tuple(reference[k].shape[1:])}: embeddings of another model?")
        batch = {tensors[k].shape[0] for k in keys}
        if len(batch) != 1:
            raise ValueError(f"precomputed conditioning tensors disagree on the batch size: {sorted(batch)}")
        return {k: tensors[k].to(self.device) for k in keys}
