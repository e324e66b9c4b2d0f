"""The released checkpoints of the spec-5 metrics, in their real layouts with tiny random weights,
through the converters of data_tools/ and the eval metrics: each score equals a direct computation
on the release's own tensors by the reference formula (BLIP's ViT written out in torch, BLIP's BERT,
ImageReward's head and standardization), and a pickle that is not plain data is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_metric_models import hpsv2_release, image_reward_release

from data_tools.convert_image_reward import convert as convert_image_reward
from data_tools.safe_checkpoint import UnsafeCheckpoint, load_state_dict
from flashdmd.config import EvalConfig
from flashdmd.eval import build_metrics
from flashdmd.eval.image_reward import REWARD_MEAN, REWARD_STD

PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "two dogs"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def vit_reference(sd: dict[str, torch.Tensor], prefix: str, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's timm-style ViT (pre-norm blocks, fused qkv, LayerNorm eps 1e-6) on its original tensor names."""
    w = lambda name: sd[prefix + name]  # noqa: E731
    patch = w("patch_embed.proj.weight").shape[-1]
    x = (
        F.conv2d(pixels, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=patch)
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([w("cls_token").expand(len(x), -1, -1), x], 1) + w("pos_embed")
    n, t, d = x.shape
    depth = len({k[len(prefix) :].split(".")[1] for k in sd if k.startswith(prefix + "blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (d,), w(b + "norm1.weight"), w(b + "norm1.bias"), 1e-6)
        q, k, v = (
            F.linear(h, w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias"))
            .view(n, t, 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ v
        x = x + F.linear(attn.transpose(1, 2).reshape(n, t, d), w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        h = F.layer_norm(x, (d,), w(b + "norm2.weight"), w(b + "norm2.bias"), 1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias"))),
            w(b + "mlp.fc2.weight"),
            w(b + "mlp.fc2.bias"),
        )
    return F.layer_norm(x, (d,), w("norm.weight"), w("norm.bias"), 1e-6)


def test_image_reward_release_through_the_converter(tmp_path):
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    release = image_reward_release(tmp_path / "release", PROMPTS)
    folder = convert_image_reward(
        release / "ImageReward.pt",
        release / "med_config.json",
        tmp_path / "converted",
        tokenizer=str(release),
        vision_heads=4,
    )
    metrics, skipped = build_metrics(EvalConfig(metrics=["image_reward"], weights={"image_reward": str(folder)}))
    assert not skipped
    x = images(4)
    metrics["image_reward"].update(x, PROMPTS)

    # direct: ImageReward.score's computation on the release's own tensors
    sd = torch.load(release / "ImageReward.pt", weights_only=True)
    tok = BertTokenizer(str(release / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            encoder_hidden_size=32,
        ),
        add_pooling_layer=False,
    ).eval()
    text.load_state_dict(
        {
            k.removeprefix("blip.text_encoder."): v
            for k, v in sd.items()
            if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")
        }
    )
    head = torch.nn.Sequential(
        *[torch.nn.Linear(a, b) for a, b in ((32, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))]
    )
    head.load_state_dict(
        {f"{i}.{p}": sd[f"mlp.layers.{j}.{p}"] for i, j in enumerate((0, 2, 4, 6, 7)) for p in ("weight", "bias")}
    )
    with torch.no_grad():
        embeds = vit_reference(sd, "blip.visual_encoder.", ((x + 1) / 2 - CLIP_MEAN) / CLIP_STD, heads=4)
        tokens = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
        )
        expected = (head(out.last_hidden_state[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD
    assert expected.std() > 1e-3  # the images are told apart
    assert metrics["image_reward"].compute() == pytest.approx(float(expected.mean()), rel=1e-5)


class Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_a_pickle_that_is_not_plain_data_is_refused(tmp_path, capsys):
    torch.save({"mlp.layers.0.weight": Payload()}, tmp_path / "ImageReward.pt")
    with pytest.raises(UnsafeCheckpoint, match="__builtin__.print"):
        load_state_dict(tmp_path / "ImageReward.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"would import and run torch\.nn\.modules\.linear\.Linear"):
        load_state_dict(tmp_path / "module.pt")
    assert "executed" not in capsys.readouterr().out


def open_clip_tower(
    sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int, causal: bool
) -> torch.Tensor:
    """open_clip's residual blocks (torch's nn.MultiheadAttention, as open_clip uses) on the release's tensors."""
    width = x.shape[-1]
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
    for i in range(
        len({k for k in sd if k.startswith(f"{prefix}transformer.resblocks.") and k.endswith("ln_1.weight")})
    ):
        b = f"{prefix}transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k[len(b) + 5 :]: v for k, v in sd.items() if k.startswith(b + "attn.")})
        h = F.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        x = x + F.linear(
            F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
            sd[b + "mlp.c_proj.weight"],
            sd[b + "mlp.c_proj.bias"],
        )
    return x


def test_hpsv2_release_through_the_converter(tmp_path):
    from transformers import AutoTokenizer

    from data_tools.convert_hpsv2 import convert

    release = hpsv2_release(tmp_path / "release")
    folder = convert(
        release / "HPS_v2.1_compressed.pt",
        tmp_path / "converted",
        tokenizer=str(release / "tokenizer"),
        vision_heads=4,
        text_heads=4,
    )
    metrics, skipped = build_metrics(EvalConfig(metrics=["hpsv2"], weights={"hpsv2": str(folder)}))
    assert not skipped
    x = images(4, seed=3)
    metrics["hpsv2"].update(x, PROMPTS)

    # direct: HPSv2's score, the cosine of open_clip's normalized image and text features
    sd = torch.load(release / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    tok = AutoTokenizer.from_pretrained(release / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        pixels = ((x + 1) / 2 - CLIP_MEAN) / CLIP_STD
        v = F.conv2d(pixels, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
        v = torch.cat([sd["visual.class_embedding"].expand(len(v), 1, -1), v], 1) + sd["visual.positional_embedding"]
        v = open_clip_tower(
            sd,
            "visual.",
            F.layer_norm(v, (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]),
            heads=4,
            causal=False,
        )
        image = F.layer_norm(v[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
        t = open_clip_tower(
            sd, "", sd["token_embedding.weight"][ids] + sd["positional_embedding"], heads=4, causal=True
        )
        t = F.layer_norm(t, (32,), sd["ln_final.weight"], sd["ln_final.bias"])
        eot = (
            (ids == tok.eos_token_id).int().argmax(-1)
        )  # open_clip: argmax of the ids, <|endoftext|> being the largest
        text = t[torch.arange(len(ids)), eot] @ sd["text_projection"]
        expected = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    assert expected.std() > 1e-3
    assert metrics["hpsv2"].compute() == pytest.approx(float(expected.mean()), abs=1e-5)
