"""MPS (Kwai's Multi-dimensional Preference Score, Zhang et al. 2024), spec section 5 column "MPS".

MPS is a CLIP ViT-H/14 (transformers' ``CLIPModel``) whose image tokens go through a
condition-aware fusion before being compared with the prompt. For one image and its prompt:

* ``text_f = text_projection(text_model(prompt).last_hidden_state)`` (every token, after the final
  LayerNorm), ``t = text_projection(pooled EOS token)``, and
  ``image_f = visual_projection(vision_model(image).last_hidden_state)`` (every token, without the
  post-LayerNorm that CLIP's pooled output gets). Prompt and condition are padded to the
  tokenizer's ``model_max_length`` and encoded without an attention mask, as the reference does.
* ``condition_f`` is ``text_f`` of the fixed "overall" condition text (``CONDITION``). Each prompt
  token's best similarity to any condition token, divided by the largest over the prompt, masks
  the prompt tokens at or under ``MASK_THRESHOLD`` out of the fusion's cross-attention.
* The fusion (``MPSFusion``): per layer, the image tokens cross-attend to the prompt tokens (multi-query:
  one key/value head) with a parallel SwiGLU feed-forward, then a parallel self-attention (rotary
  positions, multi-query) + SwiGLU block; both pre-LayerNorm and residual.
* ``MPS = logit_scale.exp() * cos(fused[:, 0], t)``; the metric is its mean (~12 in spec 5).

The release (``MPS_overall_checkpoint.pth``) is a whole pickled model; ``data_tools/convert_mps.py``
reads it without running it and writes the folder ``eval.weights.mps`` names: the backbone as a
``CLIPModel`` folder (with the laion ViT-H-14 tokenizer and image processor the reference uses),
``fusion.safetensors`` and ``fusion.json`` (the fusion's sizes). There is no default.

Departures: the reference scores one image at a time in float16 on CUDA; here batches are scored
in float32, with the similarity normalized per image (the reference's ``max()`` over its batch of
one), so values differ from it at float16 rounding level. Images are resized in torch (as for the
other CLIP metrics, flashdmd/eval/clip_score.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flashdmd.config import EvalConfig
from flashdmd.eval.clip_score import ClipEncoder
from flashdmd.eval.metrics import MeanScore, MetricUnavailable, register

# the "overall" condition of Kwai's eval scripts (eval_overall_mps_on_hpdv2.py)
CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, instance, "
    "texture, quantity, attributes, position, number, location, word, things."
)
MASK_THRESHOLD = 0.3  # Kwai's eval scripts (their training forward uses 0.01)
FUSION_FILES = ("fusion.json", "fusion.safetensors")


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with the value in the first half and the gate in the second (Kwai's order)."""
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def rotate(t: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the token axis (-2), halves layout: (x1, x2) -> (-x2, x1)."""
    angles = torch.arange(t.shape[-2], device=t.device, dtype=inv_freq.dtype)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


class FusionCrossAttention(torch.nn.Module):
    """Image tokens attend to the prompt tokens (one key/value head), plus a parallel SwiGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_in = torch.nn.Linear(dim, 2 * ff_mult * dim, bias=False)
        self.ff_out = torch.nn.Linear(ff_mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] image tokens, context [B, M, D] prompt tokens, mask [B, M] additive (0 or -inf)."""
        h = self.norm(x)
        q = self.to_q(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) * self.scale  # [B, H, N, d]
        k, v = self.to_kv(context).chunk(2, dim=-1)  # [B, M, d] each, shared by the heads
        attn = (q @ k[:, None].transpose(-1, -2) + mask[:, None, None, :]).softmax(dim=-1)
        out = (attn @ v[:, None]).transpose(1, 2).flatten(2)
        return x + self.to_out(out) + self.ff_out(swiglu(self.ff_in(h)))


class FusionBlock(torch.nn.Module):
    """Parallel self-attention (rotary, one key/value head) and SwiGLU feed-forward from one fused projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.fused = torch.nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = torch.nn.Linear(ff_mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, ff = self.fused(self.norm(x)).split(self.split, dim=-1)
        q = rotate(q.unflatten(-1, (self.heads, -1)).transpose(1, 2), self.inv_freq) * self.scale  # [B, H, N, d]
        k = rotate(k, self.inv_freq)[:, None]
        out = ((q @ k.transpose(-1, -2)).softmax(dim=-1) @ v[:, None]).transpose(1, 2).flatten(2)
        return x + self.attn_out(out) + self.ff_out(swiglu(ff))


class FusionLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.cross = FusionCrossAttention(dim, heads, dim_head, ff_mult)
        self.block = FusionBlock(dim, heads, dim_head, ff_mult)


class MPSFusion(torch.nn.Module):
    """MPS's condition-aware fusion of image tokens with the (masked) prompt tokens."""

    def __init__(self, dim: int, layers: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(FusionLayer(dim, heads, dim_head, ff_mult) for _ in range(layers))

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            image = layer.block(layer.cross(image, text, mask))
        return image


def condition_mask(text_f: torch.Tensor, condition_f: torch.Tensor) -> torch.Tensor:
    """[B, L] additive mask: 0 where a prompt token's best condition similarity, relative to the
    prompt's largest, exceeds ``MASK_THRESHOLD``; -inf elsewhere."""
    sim = torch.einsum("bid,jd->bij", text_f, condition_f).amax(dim=-1)
    sim = sim / sim.amax(dim=-1, keepdim=True)
    return torch.where(sim > MASK_THRESHOLD, 0.0, float("-inf"))


class MPS(MeanScore):
    def __init__(self, source: str, device: torch.device) -> None:
        super().__init__()
        folder = Path(source)
        missing = [name for name in FUSION_FILES if not (folder / name).is_file()]
        if missing:
            raise MetricUnavailable(
                f"{source!r} is not an MPS folder (no {', '.join(missing)}); make one from MPS_overall_checkpoint.pth "
                "with data_tools/convert_mps.py"
            )
        self.clip = ClipEncoder(source, device)
        self.clip.model.float()
        sizes = json.loads((folder / "fusion.json").read_text())
        try:
            self.fusion = MPSFusion(**{k: int(sizes[k]) for k in ("dim", "layers", "heads", "dim_head", "ff_mult")})
            self.fusion.load_state_dict(load_file(folder / "fusion.safetensors"))
        except (KeyError, RuntimeError) as err:
            raise MetricUnavailable(f"{folder / 'fusion.json'} does not match fusion.safetensors ({err})") from None
        self.fusion.float().to(device).eval()
        text = self.clip.model.config.text_config
        self.max_length = min(self.clip.tokenizer.model_max_length, text.max_position_embeddings)
        self.device = device
        with torch.no_grad():
            self.condition_f = self.text_tokens([CONDITION])[0][0]

    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(every token's projected features [B, L, D], the projected EOS features [B, D])."""
        ids = self.clip.tokenizer(
            texts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        out = self.clip.model.text_model(input_ids=ids.to(self.device))
        project = self.clip.model.text_projection
        return project(out.last_hidden_state), project(out.pooler_output)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model = self.clip.model
        image_f = model.visual_projection(model.vision_model(pixel_values=self.clip.pixels(images)).last_hidden_state)
        text_f, text_eos = self.text_tokens(prompts)
        fused = self.fusion(image_f, text_f, condition_mask(text_f, self.condition_f))[:, 0]
        return model.logit_scale.exp() * (F.normalize(fused, dim=-1) * F.normalize(text_eos, dim=-1)).sum(-1)


@register("mps", "", "MPS", "Kwai MPS overall score; weights: data_tools/convert_mps.py of the release", digits=2,
          needs_source=False)  # fmt: skip
def build_mps(source: str, device: torch.device, cfg: EvalConfig) -> MPS:
    if not source:
        raise MetricUnavailable(
            "no MPS weights configured: set eval.weights.mps to the folder data_tools/convert_mps.py makes from "
            "MPS_overall_checkpoint.pth"
        )
    return MPS(source, device)
