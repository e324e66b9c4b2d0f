"""CLIP-family image-text scores: CLIP score, PickScore and HPSv2 (spec section 5).

All three are a scaled cosine similarity between a CLIP model's image and text embeddings; they
differ in the weights and the scale:

* ``clip_score``: ``100 * max(cos, 0)`` (the torchmetrics / clean-fid definition).  Default
  weights: LAION ViT-g/14, the model of DMD2's COCO evaluation [INF: DMD2 uses open_clip's
  ViT-g-14 laion2b_s34b_b88k; this is its transformers release].
* ``pickscore``: ``logit_scale.exp() * cos / 100``, i.e. the paper's scale (0.2265, spec 5), with
  PickScore_v1 weights and the ViT-H/14 tokenizer and image processor they were trained with.
* ``hpsv2``: ``cos`` (HPSv2's own score, ~0.29 in spec 5).  The release (``HPS_v2.1_compressed.pt``)
  is an open_clip ViT-H-14 state dict: ``data_tools/convert_hpsv2.py`` reads it with
  ``weights_only=True`` once and writes the transformers ``CLIPModel`` folder that
  ``eval.weights.hpsv2`` names (no default: the hub has no such folder).

Departure: images are resized and cropped in torch (bicubic with antialiasing) from the sampler's
float output instead of through PIL on uint8 images, so scores differ from the reference
implementations in the last digits (not at all when the images already have the model's size), and
HPSv2's prompts go through transformers' CLIP tokenizer (the same BPE as open_clip's, without its
ftfy text repair).  Weights load from safetensors, or from a ``pytorch_model.bin`` that transformers
reads with ``weights_only=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdmd.config import EvalConfig
from flashdmd.eval.metrics import MeanScore, MetricUnavailable, check_source, register

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def preprocess(
    images: torch.Tensor, size: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """[-1, 1] images -> model input: resize the short side to ``size``, center crop ``crop``, normalize."""
    x = (images.float().to(device) + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(crop, round(h * scale)), max(crop, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[..., top : top + crop, left : left + crop]
    return (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)


class ClipEncoder:
    """A transformers CLIP model with its tokenizer and image preprocessing, on one device."""

    def __init__(self, source: str, device: torch.device, processor_source: str = "") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        check_source(source)
        try:
            self.model = CLIPModel.from_pretrained(source).to(device).eval()
        except (OSError, ValueError) as err:
            raise MetricUnavailable(f"cannot load CLIP weights from {source!r} ({_first_line(err)})") from None
        self.device = device
        vision = self.model.config.vision_config
        self.size, self.crop, self.mean, self.std = vision.image_size, vision.image_size, OPENAI_MEAN, OPENAI_STD
        self.tokenizer = None
        for candidate in (source, processor_source):
            if not candidate:
                continue
            try:
                self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(candidate)
                processor = CLIPImageProcessor.from_pretrained(candidate)
            except (OSError, ValueError):
                continue
            size = processor.size
            self.size = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0)) or self.size
            self.crop = processor.crop_size.get("height", self.crop) if processor.do_center_crop else self.size
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
            break
        if self.tokenizer is None:
            where = " or ".join(repr(c) for c in (source, processor_source) if c)
            raise MetricUnavailable(f"no CLIP tokenizer in {where}")

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, self.size, self.crop, self.mean, self.std, self.device)

    @torch.no_grad()
    def projected(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalized image embeddings of preprocessed ``pixels``."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projected(self.pixels(images)), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model.text_model(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class ClipSimilarity(MeanScore):
    """Mean of ``scale * cos`` (optionally clamped at 0) over images."""

    def __init__(self, encoder: ClipEncoder, scale: float, clamp_zero: bool) -> None:
        super().__init__()
        self.encoder, self.scale, self.clamp_zero = encoder, scale, clamp_zero

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.encoder.cosine(images, prompts)
        return self.scale * (cos.clamp(min=0) if self.clamp_zero else cos)


@register("clip_score", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K", "CLIP", "100 * max(cos(image, text), 0)")
def build_clip_score(source: str, device: torch.device, cfg: EvalConfig) -> ClipSimilarity:
    return ClipSimilarity(ClipEncoder(source, device), scale=100.0, clamp_zero=True)


@register("pickscore", "yuvalkirstain/PickScore_v1", "Pick", "PickScore / 100 (the paper's scale)")
def build_pickscore(source: str, device: torch.device, cfg: EvalConfig) -> ClipSimilarity:
    encoder = ClipEncoder(source, device, cfg.weights.get("pickscore_processor", PICKSCORE_PROCESSOR))
    return ClipSimilarity(encoder, scale=float(encoder.model.logit_scale.detach().exp()) / 100.0, clamp_zero=False)


@register("hpsv2", "", "HPSv2", "HPSv2 cos(image, text); weights: data_tools/convert_hpsv2.py of the release")
def build_hpsv2(source: str, device: torch.device, cfg: EvalConfig) -> ClipSimilarity:
    return ClipSimilarity(ClipEncoder(source, device), scale=1.0, clamp_zero=False)
