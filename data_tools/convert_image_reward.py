"""Convert the ImageReward release (``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``)
into the folder flashdmd's ``image_reward`` metric loads (flashdmd/eval/image_reward.py):

    python data_tools/convert_image_reward.py ImageReward.pt med_config.json OUT \
           [--tokenizer bert-base-uncased] [--vision-heads 16]

``ImageReward.pt`` is a plain state dict (``blip.visual_encoder.*``: BLIP's timm-style ViT-L/16;
``blip.text_encoder.*``: BLIP's BERT with cross-attention; ``blip.{vision,text}_proj``; ``mlp.layers.*``)
and is read with ``torch.load(weights_only=True)``. OUT gets a transformers
``BlipForImageTextRetrieval`` (safetensors; the ViT keys renamed to transformers' layout, the text
encoder's names are the same), the BERT tokenizer with ImageReward's added ``[DEC]``/``[ENC]``
tokens, and ``mlp.safetensors`` (the reward head). The ITM head, which ImageReward has no weights
for and never uses, keeps its initialisation.

ViT sizes come from the tensors; the head count does not (the ViT-L of ImageReward has 16 heads of
64, the default ``width // 64``). Text sizes come from ``med_config.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.safe_checkpoint import load_state_dict, run_converter  # noqa: E402

VIT = "blip.visual_encoder."
# BLIP's ViT names -> transformers' BlipVisionModel names (inside vision_model.)
VIT_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def vit_key(key: str) -> str:
    for pattern, replacement in VIT_RENAMES:
        renamed, n = re.subn(pattern, replacement, key)
        if n:
            return f"vision_model.{renamed}"
    raise KeyError(f"unexpected ImageReward ViT tensor {VIT}{key}")


def blip_state(release: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(BlipForImageTextRetrieval state dict, reward-head state dict) from the release's tensors."""
    blip, head = {}, {}
    for key, value in release.items():
        if key.startswith(VIT):
            blip[vit_key(key[len(VIT) :])] = value
        elif key.startswith("blip.") and not key.endswith("position_ids"):  # a buffer transformers recomputes
            blip[key[len("blip.") :]] = value
        elif key.startswith("mlp.layers."):
            head[key[len("mlp.") :]] = value
    if not head or "vision_model.embeddings.class_embedding" not in blip:
        raise KeyError("not an ImageReward checkpoint: no blip.visual_encoder.* and mlp.layers.* tensors")
    return blip, head


def blip_config(release: dict[str, torch.Tensor], med_config: dict, vision_heads: int = 0):
    from transformers import BlipConfig

    width = release[f"{VIT}pos_embed"].shape[-1]
    patch = release[f"{VIT}patch_embed.proj.weight"].shape[-1]
    tokens = release[f"{VIT}pos_embed"].shape[1] - 1
    depth = 1 + max(int(m.group(1)) for k in release if (m := re.match(rf"{re.escape(VIT)}blocks\.(\d+)\.", k)))
    vision = {
        "hidden_size": width,
        "intermediate_size": release[f"{VIT}blocks.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": vision_heads or width // 64,
        "patch_size": patch,
        "image_size": patch * round(tokens**0.5),
        "layer_norm_eps": 1e-6,
    }  # BLIP's ViT LayerNorm eps
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
    )
    text = {k: med_config[k] for k in keys if k in med_config} | {"encoder_hidden_size": width}
    return BlipConfig(
        text_config=text, vision_config=vision, image_text_hidden_size=release["blip.vision_proj.weight"].shape[0]
    )


def convert(
    checkpoint: str | Path,
    med_config: str | Path,
    out: str | Path,
    tokenizer: str = "bert-base-uncased",
    vision_heads: int = 0,
) -> Path:
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    release = load_state_dict(checkpoint)
    blip_tensors, head = blip_state(release)
    model = BlipForImageTextRetrieval(blip_config(release, json.loads(Path(med_config).read_text()), vision_heads))
    missing, unexpected = model.load_state_dict(blip_tensors, strict=False)
    missing = [k for k in missing if not k.startswith("itm_head.")]
    if missing or unexpected:
        raise KeyError(f"ImageReward -> BLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out)
    tok = BertTokenizer.from_pretrained(tokenizer)
    tok.add_special_tokens(
        {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
    )  # ImageReward's init_tokenizer
    tok.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in head.items()}, str(out / "mlp.safetensors"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="ImageReward.pt")
    parser.add_argument("med_config", help="med_config.json of the same release")
    parser.add_argument("out", help="output folder (eval.weights.image_reward)")
    parser.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer folder or hub id")
    parser.add_argument("--vision-heads", type=int, default=0, help="ViT attention heads (default: width // 64)")
    args = parser.parse_args(argv)
    return run_converter("convert_image_reward", "image_reward",
                         lambda: convert(args.checkpoint, args.med_config, args.out, args.tokenizer, args.vision_heads))


if __name__ == "__main__":
    sys.exit(main())
