"""Random-weight metric models for the evaluation tests, in the layout of each real release: a tiny
CLIP (CLIP score, PickScore, FD-CLIP; save_pretrained), a tiny ImageReward release (its ``.pt``
state dict), a tiny HPSv2 release (an open_clip state dict), a tiny MPS release and the FID
Inception (torch-fidelity's module keys)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from flashdmd.nets.tiny import tiny_clip_tokenizer


def tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = tiny_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


def image_reward_release(folder: Path, prompts: list[str]) -> Path:
    """A random-weight ImageReward release in its real layout: ``ImageReward.pt`` (a plain state dict
    with BLIP's original ViT names, BLIP's BERT, the projections and ``mlp.layers.*``), ``med_config.json``
    and a BERT ``vocab.txt`` of the prompts' words. The text encoder is built with transformers'
    BlipTextModel, whose tensor names are those of BLIP's own BERT."""
    from transformers import BlipTextConfig, BlipTextModel

    from flashdmd.eval.image_reward import reward_head

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for p in prompts for w in p.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    med = {**TINY, "vocab_size": len(words) + 7, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 32}  # + [DEC], [ENC]
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    text = BlipTextModel(BlipTextConfig(**{k: v for k, v in med.items() if k != "encoder_width"},
                                        encoder_hidden_size=32), add_pooling_layer=False)
    release = {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    release["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # a persistent buffer in BLIP's BERT
    width, patch, tokens = 32, 8, (32 // 8) ** 2 + 1

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape) * scale

    vit = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, tokens, width),
           "patch_embed.proj.weight": rand(width, 3, patch, patch, scale=0.05), "patch_embed.proj.bias": rand(width),
           "norm.weight": 1 + rand(width), "norm.bias": rand(width)}
    for i in range(2):
        for name, shape in (("norm1", (width,)), ("norm2", (width,)), ("attn.qkv", (3 * width, width)),
                            ("attn.proj", (width, width)), ("mlp.fc1", (48, width)), ("mlp.fc2", (width, 48))):
            vit[f"blocks.{i}.{name}.weight"] = 1 + rand(*shape) if len(shape) == 1 else rand(*shape)
            vit[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    release |= {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    release |= {"blip.vision_proj.weight": rand(16, width), "blip.vision_proj.bias": rand(16),
                "blip.text_proj.weight": rand(16, 32), "blip.text_proj.bias": rand(16)}
    release |= {f"mlp.layers.{k}": rand(*v.shape, scale=0.3) for k, v in reward_head(32).state_dict().items()}
    torch.save(release, folder / "ImageReward.pt")
    return folder


def tiny_image_reward(folder: Path, prompts: list[str]) -> Path:
    """The tiny ImageReward release converted with data_tools/convert_image_reward.py (eval.weights.image_reward)."""
    from data_tools.convert_image_reward import convert

    release = image_reward_release(folder / "release", prompts)
    return convert(release / "ImageReward.pt", release / "med_config.json", folder / "converted",
                   tokenizer=str(release), vision_heads=4)


def _open_clip_blocks(prefix: str, width: int, layers: int, rand) -> dict[str, torch.Tensor]:
    blocks = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        for name, shape in (("ln_1", (width,)), ("ln_2", (width,)), ("attn.in_proj", (3 * width, width)),
                            ("attn.out_proj", (width, width)), ("mlp.c_fc", (4 * width, width)),
                            ("mlp.c_proj", (width, 4 * width))):
            blocks[f"{b}{name}_weight" if name == "attn.in_proj" else f"{b}{name}.weight"] = (
                1 + rand(*shape) if len(shape) == 1 else rand(*shape))
            blocks[f"{b}{name}_bias" if name == "attn.in_proj" else f"{b}{name}.bias"] = rand(shape[0])
    return blocks


def hpsv2_release(folder: Path) -> Path:
    """A random-weight HPSv2 release in its real layout: ``HPS_v2.1_compressed.pt`` = ``{"state_dict": ...}``
    with open_clip's ViT names (fused ``in_proj`` attention, ``proj`` matrices), and the CLIP tokenizer
    folder it is used with. Tiny: both towers 32 wide, 2 blocks of 4 heads; 32 px images, patch 8."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    w, ctx = 32, 16
    sd = {"visual.class_embedding": rand(w), "visual.positional_embedding": rand(17, w),
          "visual.conv1.weight": rand(w, 3, 8, 8, scale=0.05), "visual.proj": rand(w, 16),
          "visual.ln_pre.weight": 1 + rand(w), "visual.ln_pre.bias": rand(w),
          "visual.ln_post.weight": 1 + rand(w), "visual.ln_post.bias": rand(w),
          "token_embedding.weight": rand(len(tokenizer), w), "positional_embedding": rand(ctx, w),
          "ln_final.weight": 1 + rand(w), "ln_final.bias": rand(w), "text_projection": rand(w, 16),
          "logit_scale": torch.tensor(4.6052)}
    sd |= _open_clip_blocks("visual.", w, 2, rand) | _open_clip_blocks("", w, 2, rand)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    return folder


def fid_inception_weights(path: Path, seed: int = 0) -> Path:
    """A random-weight FID Inception state dict in the release's layout (torch-fidelity's module keys)."""
    from flashdmd.eval.inception import inception_class

    class Unloaded(inception_class()):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in model.modules():  # He-initialised convolutions keep activations O(1) through 94 layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.9, 1.1)
    torch.save(model.state_dict(), path)
    empty.unlink()
    return path
