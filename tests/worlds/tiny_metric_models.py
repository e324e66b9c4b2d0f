"""Random-weight metric models for the evaluation tests, written with save_pretrained like real ones:
a tiny CLIP (CLIP score, PickScore, HPSv2, FD) and a tiny BLIP + ImageReward head."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

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


def tiny_image_reward(folder: Path, prompts: list[str]) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from flashdmd.eval.image_reward import reward_head

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for p in prompts for w in p.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**sizes, "vocab_size": len(tokenizer), "encoder_hidden_size": 32, "max_position_embeddings": 40}
    vision = {**sizes, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head = reward_head(32)
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(folder / "mlp.safetensors"))
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
