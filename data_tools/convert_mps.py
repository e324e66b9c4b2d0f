"""Convert the MPS release (Kwai-Kolors/MPS: ``MPS_overall_checkpoint.pth``) into the folder
flashdmd's ``mps`` metric loads (flashdmd/eval/mps.py):

    python data_tools/convert_mps.py MPS_overall_checkpoint.pth OUT \
           [--processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K]

The release is a whole pickled model (``torch.save(model)`` of Kwai's ``trainer.models.clip_model.CLIPModel``):
``.model``, a transformers ``CLIPModel`` subclass with its pickled ``CLIPConfig``, and ``.cross_model``,
the fusion (``layers.N.0.fn``: cross-attention + feed-forward; ``layers.N.1.fn``: parallel
self-attention block). It is read with ``data_tools.safe_checkpoint.load_inert``: no class it names is
imported or run, and a pickle that calls anything but torch's tensor rebuilds is refused.

OUT gets the backbone as a ``CLIPModel`` folder (``config.json`` from the pickled config's sizes,
``model.safetensors``, each tensor in the release's dtype), the tokenizer and image processor of ``--processor``
(the reference eval loads both from the laion ViT-H-14), ``fusion.safetensors`` (renamed to
``MPSFusion``'s names) and ``fusion.json`` (its sizes, read from the tensors and checked against the
pickled head count).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.safe_checkpoint import Inert, load_inert, module_tensors, run_converter

PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Kwai's fusion names (inside cross_model.layers.N.) -> MPSFusion's (inside layers.N.)
FUSION_RENAMES = {
    "0.fn.norm.weight": "cross.norm.weight", "0.fn.norm.bias": "cross.norm.bias",
    "0.fn.to_q.weight": "cross.to_q.weight", "0.fn.to_kv.weight": "cross.to_kv.weight",
    "0.fn.to_out.weight": "cross.to_out.weight", "0.fn.ff.0.weight": "cross.ff_in.weight",
    "0.fn.ff.2.weight": "cross.ff_out.weight",
    "1.fn.norm.weight": "block.norm.weight", "1.fn.norm.bias": "block.norm.bias",
    "1.fn.rotary_emb.inv_freq": "block.inv_freq", "1.fn.fused_attn_ff_proj.weight": "block.fused.weight",
    "1.fn.attn_out.weight": "block.attn_out.weight", "1.fn.ff_out.1.weight": "block.ff_out.weight",
}  # fmt: skip
TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "hidden_act", "layer_norm_eps",
)  # fmt: skip


def state_of(obj: Any, what: str) -> dict:
    if isinstance(obj, Inert):
        return obj.state
    if isinstance(obj, dict):
        return obj
    raise KeyError(f"not an MPS checkpoint: {what} is missing")


def submodule(module: Any, path: str) -> Any:
    """The stand-in module at the dotted ``path`` under ``module``."""
    for name in path.split("."):
        children = state_of(module, path).get("_modules") or {}
        if name not in children:
            raise KeyError(f"not an MPS checkpoint: no module {path}")
        module = children[name]
    return module


def fusion_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"cross_model\.layers\.(\d+)\.(.+)", key)
        if match is None or match.group(2) not in FUSION_RENAMES:
            raise KeyError(f"unexpected MPS fusion tensor {key}")
        out[f"layers.{match.group(1)}.{FUSION_RENAMES[match.group(2)]}"] = value
    return out


def fusion_sizes(fusion: dict[str, torch.Tensor], cross_attention: dict) -> dict[str, int]:
    """The fusion's sizes from its tensors; the pickled head count of its first cross-attention must agree."""
    q, kv, ff_in = (fusion[f"layers.0.cross.{n}.weight"] for n in ("to_q", "to_kv", "ff_in"))
    dim, dim_head = q.shape[1], kv.shape[0] // 2
    sizes = {
        "dim": dim,
        "layers": 1 + max(int(k.split(".")[1]) for k in fusion),
        "heads": q.shape[0] // dim_head,
        "dim_head": dim_head,
        "ff_mult": ff_in.shape[0] // (2 * dim),
    }
    pickled = cross_attention.get("heads")
    if pickled is not None and pickled != sizes["heads"]:
        raise KeyError(f"MPS fusion: the tensors give {sizes['heads']} heads, the pickle says {pickled}")
    return sizes


def clip_config(config: dict):
    from transformers import CLIPConfig

    text = state_of(config.get("text_config"), "the pickled CLIP text config")
    vision = state_of(config.get("vision_config"), "the pickled CLIP vision config")
    if "projection_dim" not in config:
        raise KeyError("not an MPS checkpoint: the pickled CLIP config has no projection_dim")
    return CLIPConfig(
        text_config={k: text[k] for k in TEXT_KEYS if k in text},
        vision_config={k: vision[k] for k in VISION_KEYS if k in vision},
        projection_dim=config["projection_dim"],
        logit_scale_init_value=config.get("logit_scale_init_value", 2.6592),
    )


def convert(checkpoint: str | Path, out: str | Path, processor: str = PROCESSOR) -> Path:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    root = load_inert(checkpoint)
    clip, cross = submodule(root, "model"), submodule(root, "cross_model")
    backbone = module_tensors(clip)
    fusion = fusion_tensors(module_tensors(cross, "cross_model."))
    sizes = fusion_sizes(fusion, state_of(submodule(cross, "layers.0.0.fn"), "cross_model.layers.0.0.fn"))
    if "logit_scale" not in backbone:
        raise KeyError("not an MPS checkpoint: its CLIP model has no logit_scale")

    config = clip_config(state_of(state_of(clip, "model").get("config"), "the pickled CLIP config"))
    if config.projection_dim != sizes["dim"]:
        raise KeyError(f"MPS fusion width {sizes['dim']} differs from the CLIP projection_dim {config.projection_dim}")
    model = CLIPModel(config)
    try:  # assign: every tensor keeps the release's dtype and values
        missing, unexpected = model.load_state_dict(
            {k: v.clone() for k, v in backbone.items() if not k.endswith("position_ids")}, strict=False, assign=True
        )
    except RuntimeError as err:
        raise KeyError(
            f"MPS backbone does not fit its pickled CLIP config: {str(err).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise KeyError(f"MPS backbone -> CLIPModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(processor).save_pretrained(out)
    CLIPImageProcessor.from_pretrained(processor).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in fusion.items()}, str(out / "fusion.safetensors"))
    (out / "fusion.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="MPS_overall_checkpoint.pth")
    parser.add_argument("out", help="output folder (eval.weights.mps)")
    parser.add_argument(
        "--processor", default=PROCESSOR, help="folder or hub id of the CLIP tokenizer + image processor"
    )
    args = parser.parse_args(argv)
    return run_converter("convert_mps", "mps", lambda: convert(args.checkpoint, args.out, args.processor))


if __name__ == "__main__":
    sys.exit(main())
