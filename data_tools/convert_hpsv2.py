"""Convert the HPSv2 release (``xswu/HPSv2``: ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt``,
an open_clip ViT-H-14 fine-tune) into the transformers ``CLIPModel`` folder flashdmd's ``hpsv2``
metric loads (flashdmd/eval/clip_score.py):

    python data_tools/convert_hpsv2.py HPS_v2.1_compressed.pt OUT \
           [--tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K] [--vision-heads 16] [--text-heads 16]

The release is ``{"state_dict": {...}}`` of plain tensors with open_clip's names (OpenAI CLIP's
layout: ``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...) and is read
with ``torch.load(weights_only=True)``. Each fused ``in_proj`` is split into q/k/v, the projections
are transposed into Linear weights, and OUT gets ``model.safetensors`` + ``config.json``, the
tokenizer of ``--tokenizer`` (open_clip's BPE, as released with the laion ViT-H-14) and a
``CLIPImageProcessor`` (resize + center crop to the model's size, OpenAI mean/std: open_clip's
eval transform). Sizes come from the tensors; head counts do not (ViT-H-14: 16 of 80 in the image
tower, 16 of 64 in the text tower, the defaults). open_clip's ViT-H-14 uses exact GELU.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.safe_checkpoint import load_state_dict, run_converter  # noqa: E402

BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def tower(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """The residual blocks under ``src`` (open_clip) as transformers CLIPEncoder tensors under ``dst``."""
    out = {}
    for key, value in sd.items():
        m = re.match(rf"{re.escape(src)}transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$", key)
        if not m:
            continue
        layer, name, kind = m.groups()
        base = f"{dst}encoder.layers.{layer}."
        if name == "attn.in_proj":  # fused [q; k; v] of nn.MultiheadAttention
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{base}self_attn.{proj}.{kind}"] = part
        else:
            out[f"{base}{BLOCK[name]}.{kind}"] = value
    return out


def clip_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP (ViT image tower, OpenAI-style text tower) -> transformers CLIPModel tensors."""
    v, t = "vision_model.", "text_model."
    out = {
        f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{v}pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        f"{v}pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        f"{v}post_layernorm.weight": sd["visual.ln_post.weight"],
        f"{v}post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
        f"{t}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{t}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{t}final_layer_norm.weight": sd["ln_final.weight"],
        f"{t}final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "logit_scale": sd["logit_scale"],
    }
    return {**out, **tower(sd, "visual.", v), **tower(sd, "", t)}


def clip_config(sd: dict[str, torch.Tensor], tokenizer, vision_heads: int = 0, text_heads: int = 0):
    from transformers import CLIPConfig

    def layers(prefix: str) -> int:
        return 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}transformer\.resblocks\.(\d+)\.", k)))

    width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["token_embedding.weight"].shape[1]
    vision = {
        "hidden_size": width,
        "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": layers(r"visual\."),
        "num_attention_heads": vision_heads or width // 80,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    text = {
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "hidden_size": text_width,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": layers(""),
        "num_attention_heads": text_heads or text_width // 64,
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1])


def convert(
    checkpoint: str | Path,
    out: str | Path,
    tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    vision_heads: int = 0,
    text_heads: int = 0,
) -> Path:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    release = load_state_dict(checkpoint)
    sd = release.get("state_dict", release) if isinstance(release, dict) else release
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "visual.conv1.weight" not in sd:
        raise KeyError(f"{checkpoint} is not an open_clip ViT checkpoint (no visual.conv1.weight)")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = clip_config(sd, tok, vision_heads, text_heads)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(clip_tensors(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"open_clip -> CLIPModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)")
    parser.add_argument("out", help="output folder (eval.weights.hpsv2)")
    parser.add_argument(
        "--tokenizer",
        default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        help="CLIP tokenizer folder or hub id (open_clip's BPE)",
    )
    parser.add_argument("--vision-heads", type=int, default=0, help="image-tower heads (default: width // 80)")
    parser.add_argument("--text-heads", type=int, default=0, help="text-tower heads (default: width // 64)")
    args = parser.parse_args(argv)
    return run_converter("convert_hpsv2", "hpsv2",
                         lambda: convert(args.checkpoint, args.out, args.tokenizer, args.vision_heads, args.text_heads))


if __name__ == "__main__":
    sys.exit(main())
