"""ImageReward (Xu et al. 2023) on transformers' BLIP classes (spec section 5, column "ImgRwd").

ImageReward is BLIP (ViT image encoder; BERT text encoder cross-attending to the image tokens)
with an MLP head on the text encoder's first token, standardized by fixed constants:
``reward = (mlp(text_encoder(prompt, image)[:, 0]) - 0.16717362830052426) / 1.0333394966054072``.

The release (``THUDM/ImageReward``: ``ImageReward.pt``, a plain state dict of BLIP's original
layout, and ``med_config.json``) is converted once by ``data_tools/convert_image_reward.py``
(``weights_only=True``) into the folder ``eval.weights.image_reward`` names: a transformers
``BlipForImageTextRetrieval`` (safetensors), its tokenizer, and ``mlp.safetensors`` with the head
(``layers.{0,2,4,6,7}.{weight,bias}``, ImageReward's MLP layout). There is no default.
Images are resized to the vision model's size (bicubic, torch) with CLIP's mean and std, as
ImageReward's own transform does on PIL images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from flashdmd.config import EvalConfig
from flashdmd.eval.clip_score import OPENAI_MEAN, OPENAI_STD, preprocess
from flashdmd.eval.metrics import MeanScore, MetricUnavailable, register

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # ImageReward's tokenizer max_length


def reward_head(width: int) -> torch.nn.Sequential:
    """ImageReward's MLP (dropout layers kept so the state-dict keys match the original)."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )  # fmt: skip


class ImageReward(MeanScore):
    def __init__(self, source: str, device: torch.device) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        folder = Path(source)
        if not (folder / "mlp.safetensors").is_file():
            raise MetricUnavailable(
                f"{source!r} is not an ImageReward folder (BlipForImageTextRetrieval + tokenizer + mlp.safetensors); "
                "make one from the release with data_tools/convert_image_reward.py"
            )
        try:
            blip = BlipForImageTextRetrieval.from_pretrained(folder, use_safetensors=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise MetricUnavailable(f"cannot load BLIP weights or tokenizer from {source!r} ({err})") from None
        self.vision, self.text = blip.vision_model.to(device).eval(), blip.text_encoder.to(device).eval()
        self.head = reward_head(blip.config.text_config.hidden_size)
        self.head.load_state_dict(
            {k.removeprefix("layers."): v for k, v in load_file(folder / "mlp.safetensors").items()}
        )
        self.head.to(device).eval()
        self.size = blip.config.vision_config.image_size
        self.device = device

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = preprocess(images, self.size, self.size, OPENAI_MEAN, OPENAI_STD, self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        text = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        )
        reward = self.head(text.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


@register("image_reward", "", "ImgRwd", "ImageReward, standardized")
def build_image_reward(source: str, device: torch.device, cfg: EvalConfig) -> ImageReward:
    return ImageReward(source, device)
