"""Latent reward model (LRM) of LPO, spec 3.1: scores noisy latents at a timestep, no VAE decode.

S(p, x_t) = exp(tau) * cos(V, T) with
- V = W_proj [pool(d_1), ..., pool(d_B), pool(m_enh)]: d_b is the output of down block b's last
  resnet/attention layer (before its downsampler; LPO's down_block_res_samples[2, 5, 8(, 11)]),
  taken from the conditional branch; m_enh = m_u + gs (m_c - m_u) is the mid-block output with
  the prompt (m_c) and with the empty prompt (m_u) (visual feature enhancement, gs = 7.5);
  pool = spatial mean. SDXL: 320 + 640 + 1280 + 1280 = 3520 -> 1280; SD1.5: 4800 -> 768.
- T = the prompt's text feature: SDXL style, bigG's projected EOS embedding; SD1.5 style, the
  CLIP-L pooled output through a separate linear ``text_projection``.
- tau learnable (init 2.6592).

The LRM has its own UNet and text encoders (LPO fine-tunes them), so it reads its own token ids
from the Conditioning: ``lrm_ids`` (and ``lrm_ids_2`` for SDXL style), which ``tokenize`` makes.
Only the down and mid blocks run (LPO's ``use_up_blocks=False``), so ``load`` drops the UNet's
up blocks and output layers (``trim``): about 60 % of an SDXL UNet's parameters are never held.

Folders: ``save`` writes unet/, text_encoder(_2)/, tokenizer(_2)/, ``head.safetensors``
(visual_projection.weight, [text_projection.weight], logit_scale) and ``lrm.json`` (style, gs,
resolution). ``load`` also reads LPO's released layout: unet/, optional text_encoder(_2)/ and
``state_dict.pt`` (read with ``torch.load(weights_only=True)``), with tokenizers and any
missing text encoder taken from the base diffusers folder. Departure: for SD3 (16-channel
latents) no public LRM exists; the tiny-sd3 preset uses an SDXL-style UNet LRM on SD3 latents.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd.nets.interfaces import Conditioning

LOGIT_SCALE_INIT = 2.6592  # log(1 / 0.07), CLIP's initial temperature


def _pool(x: Tensor) -> Tensor:
    return x.float().mean(dim=(2, 3))


class LatentRewardModel(nn.Module):
    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], tokenizers: list[Any], style: str,
                 guidance_scale: float = 7.5, resolution: int = 1024, projection_dim: int | None = None) -> None:
        super().__init__()
        if style not in ("sd15", "sdxl"):
            raise ValueError(f"LRM style must be 'sd15' or 'sdxl', got {style!r}")
        layers = unet.config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError("LRM needs a UNet with one layers_per_block value for all down blocks")
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers
        self.style = style
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        channels = list(unet.config.block_out_channels)
        # index into down_block_res_samples (conv_in first, then layers + 1 per block with a downsampler)
        self.tap_index = [b * (layers + 1) + layers for b in range(len(channels))]
        self.feature_dim = sum(channels) + channels[-1]
        text_dim = text_encoders[-1].config.projection_dim if style == "sdxl" else text_encoders[0].config.hidden_size
        dim = projection_dim or text_dim
        self.visual_projection = nn.Linear(self.feature_dim, dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        self.text_projection = nn.Linear(text_dim, dim, bias=False) if style == "sd15" else None
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.trimmed = False

    # -- construction and persistence ------------------------------------------------------

    @classmethod
    def from_base(cls, base_dir: Path, family: Any, guidance_scale: float = 7.5,
                  unet: nn.Module | None = None) -> "LatentRewardModel":
        """A fresh LRM initialised from a diffusers folder's UNet (or ``unet``) and text encoders (LPO's init)."""
        from flashdmd.nets.load import load_pipeline_folder

        parts = load_pipeline_folder(Path(base_dir), family)
        style = "sd15" if family.kind == "sd15" else "sdxl"
        if unet is None and family.kind == "sd3":
            raise ValueError("an SD3 base has no UNet; pass the LRM's unet (see the module docstring)")
        return cls(unet or parts.denoiser, parts.text_encoders, parts.tokenizers, style, guidance_scale,
                   family.resolution)

    def trim(self) -> "LatentRewardModel":
        """Drop what ``down_mid`` never runs: the UNet's up blocks and output layers."""
        unet = self.unet
        unet.up_blocks = nn.ModuleList()
        unet.conv_norm_out = unet.conv_act = None
        unet.conv_out = nn.Identity()
        self.trimmed = True
        return self

    def save(self, folder: Path) -> None:
        if self.trimmed:
            raise ValueError("a trimmed LRM (no up blocks) cannot be saved as a diffusers UNet; save before trim()")
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        for i, (enc, tok) in enumerate(zip(self.text_encoders, self.tokenizers)):
            suffix = f"_{i + 1}" if i else ""
            enc.save_pretrained(folder / f"text_encoder{suffix}")
            tok.save_pretrained(folder / f"tokenizer{suffix}")
        head = {"visual_projection.weight": self.visual_projection.weight.detach().contiguous(),
                "logit_scale": self.logit_scale.detach().reshape(1)}
        if self.text_projection is not None:
            head["text_projection.weight"] = self.text_projection.weight.detach().contiguous()
        save_file(head, str(folder / "head.safetensors"))
        (folder / "lrm.json").write_text(json.dumps(
            {"style": self.style, "guidance_scale": self.guidance_scale, "resolution": self.resolution}, indent=2))

    @classmethod
    def load(cls, folder: Path, base_dir: Path | None = None, style: str = "", guidance_scale: float = 7.5,
             resolution: int = 1024, dtype: torch.dtype = torch.float32, trim: bool = True) -> "LatentRewardModel":
        """Our layout (head.safetensors) or LPO's (state_dict.pt); ``base_dir`` supplies what LPO leaves out.
        With ``trim`` the up blocks are dropped once loaded (they never run)."""
        import transformers
        from diffusers import UNet2DConditionModel

        folder = Path(folder)
        layout = ("an LRM folder: unet/ plus head.safetensors and lrm.json (flashdmd), or unet/ plus state_dict.pt "
                  "(Kwai-Kolors/LPO), text_encoder(_2)/ and tokenizer(_2)/ there or in the base diffusers folder")
        if not (folder / "unet").is_dir():
            raise ValueError(f"model.reward_model: '{folder}' has no unet/; expected {layout}")
        meta = json.loads((folder / "lrm.json").read_text()) if (folder / "lrm.json").is_file() else {}
        style = meta.get("style", style)
        if style not in ("sd15", "sdxl"):
            raise ValueError(f"model.reward_model: '{folder}' has no lrm.json; the family must say the style "
                             f"('sd15' or 'sdxl'), got {style!r}")
        names = ["text_encoder"] + (["text_encoder_2"] if style == "sdxl" else [])

        def source(sub: str) -> Path:
            if (folder / sub).is_dir():
                return folder / sub
            if base_dir is not None and (Path(base_dir) / sub).is_dir():
                return Path(base_dir) / sub
            raise ValueError(f"model.reward_model: no {sub}/ in '{folder}' or the base folder '{base_dir}'; "
                             f"expected {layout}")

        def encoder(sub: str) -> nn.Module:
            path = source(sub)
            arch = json.loads((path / "config.json").read_text()).get("architectures") or ["CLIPTextModel"]
            return getattr(transformers, arch[0]).from_pretrained(path, torch_dtype=dtype)

        encoders = [encoder(n) for n in names]
        tokenizers = [transformers.AutoTokenizer.from_pretrained(source(n.replace("text_encoder", "tokenizer")))
                      for n in names]
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        if (folder / "head.safetensors").is_file():
            head = load_file(str(folder / "head.safetensors"))
        elif (folder / "state_dict.pt").is_file():
            raw = torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)
            head = {"visual_projection.weight": raw["visual_projection"]["weight"],
                    "logit_scale": torch.as_tensor(raw["logit_scale"], dtype=torch.float32).reshape(1)}
            if "text_projection" in raw:
                head["text_projection.weight"] = raw["text_projection"]["weight"]
        else:
            raise ValueError(f"model.reward_model: '{folder}' has neither head.safetensors nor state_dict.pt; "
                             f"expected {layout}")
        model = cls(unet, encoders, tokenizers, style, meta.get("guidance_scale", guidance_scale),
                    meta.get("resolution", resolution), projection_dim=head["visual_projection.weight"].shape[0])
        if head["visual_projection.weight"].shape[1] != model.feature_dim:
            raise ValueError(f"model.reward_model: visual_projection takes {head['visual_projection.weight'].shape[1]} "
                             f"features but this UNet gives {model.feature_dim}")
        with torch.no_grad():
            model.visual_projection.weight.copy_(head["visual_projection.weight"])
            model.logit_scale.copy_(head["logit_scale"].reshape(()))
            if model.text_projection is not None:
                if "text_projection.weight" not in head:
                    raise ValueError(f"model.reward_model: an SD1.5-style LRM needs text_projection in '{folder}'")
                model.text_projection.weight.copy_(head["text_projection.weight"])
        return (model.trim() if trim else model).to(dtype)

    # -- prompts ------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> Conditioning:
        """The LRM's own token ids, stored in the Conditioning (keys ``lrm_ids``, ``lrm_ids_2``)."""
        device = self.logit_scale.device
        out = {}
        for i, tok in enumerate(self.tokenizers):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out["lrm_ids" if i == 0 else f"lrm_ids_{i + 1}"] = ids.to(device)
        return out

    def _encode(self, cond: Conditioning) -> tuple[Tensor, Tensor | None, Tensor]:
        """(UNet context, SDXL pooled added cond or None, text feature T) for the ids in ``cond``."""
        if self.style == "sd15":
            out = self.text_encoders[0](cond["lrm_ids"])
            return out[0], None, self.text_projection(out[1])
        h1 = self.text_encoders[0](cond["lrm_ids"], output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoders[1](cond["lrm_ids_2"], output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2[0], out2[0]

    # -- the network --------------------------------------------------------------------------

    def down_mid(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """UNet conv_in, down blocks and mid block only; returns (tapped down features, mid output)."""
        unet = self.unet
        added = None
        if pooled is not None:
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        h = unet.conv_in(x)
        res: tuple[Tensor, ...] = (h,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, r_ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, r_ = block(hidden_states=h, temb=emb)
            res += r_
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb)
        return [res[i] for i in self.tap_index], h

    def pooled_features(self, latents: Tensor, t: Tensor, cond: Conditioning,
                        guidance_scale: float | None = None) -> Tensor:
        """The multi-scale feature vector before projection, with VFE on the mid block."""
        gs = self.guidance_scale if guidance_scale is None else guidance_scale
        n = latents.shape[0]
        null = self.tokenize([""] * n)
        both = {k: torch.cat([cond[k], null[k]]) for k in null}
        context, pooled, _ = self._encode(both)
        dtype = self.unet.dtype
        x = torch.cat([latents, latents]).to(dtype)
        t2 = torch.cat([t, t]) if t.dim() else t
        downs, mid = self.down_mid(x, t2, context.to(dtype), None if pooled is None else pooled.to(dtype))
        mid_c, mid_u = _pool(mid).chunk(2)
        mid_enh = mid_u + gs * (mid_c - mid_u)  # VFE: V_mid_u + gs (V_mid_c - V_mid_u)
        return torch.cat([_pool(d)[:n] for d in downs] + [mid_enh], dim=-1)

    def image_features(self, latents: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float | None = None) -> Tensor:
        feats = self.pooled_features(latents, t, cond, guidance_scale)
        return self.visual_projection(feats.to(self.visual_projection.weight.dtype))

    def text_features(self, cond: Conditioning) -> Tensor:
        return self._encode(cond)[2]

    def forward(self, latents: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Scores S(p, x_t), shape (B,): exp(tau) times the cosine of image and text features."""
        v = self.image_features(latents, t, cond).float()
        txt = self.text_features(cond).float()
        v = v / v.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.logit_scale.float().exp() * (v * txt).sum(-1)
