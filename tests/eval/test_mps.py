"""MPS: a tiny release in the real one's layout (a whole ``torch.save(model)`` of classes registered
under Kwai's module paths, ``trainer.models.clip_model`` / ``trainer.models.cross_modeling``, around a
transformers CLIPModel subclass) goes through data_tools/convert_mps.py, which must neither import
nor run those classes and must keep every weight; the eval job's MPS then equals the reference
formula (Kwai's eval script: one image at a time, the fusion written out with einsum on the
release's own tensor names)."""

from __future__ import annotations

import io
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from data_tools.convert_mps import FUSION_RENAMES, convert, main
from data_tools.safe_checkpoint import UnsafeCheckpoint, load_inert
from flashdmd.apps.evaluate import measure
from flashdmd.config import Config
from flashdmd.eval.mps import CONDITION
from flashdmd.nets.tiny import TOKEN_LENGTH, tiny_clip_tokenizer

PROMPTS = ["a photo of a cat", "light color and tone", "a bowl of fruit", "two dogs in the snow"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
FUSION = {"dim": 16, "layers": 2, "heads": 2, "dim_head": 8, "ff_mult": 2}


class KwaiCodeRan(AssertionError):
    pass


class Tripwire(torch.nn.Module):
    """Unpickling one of these (torch.load of the whole model) runs this: the converter must not."""

    def __setstate__(self, state):
        raise KwaiCodeRan(f"{type(self).__name__}.__setstate__ ran")


# the release's classes, by Kwai's module paths and attribute names (structure only: no forward)
class LayerNorm(Tripwire):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))


class Residual(Tripwire):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn


class RotaryEmbedding(Tripwire):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


class SwiGLU(Tripwire):
    pass


class ParallelTransformerBlock(Tripwire):
    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.heads, self.scale = heads, dim_head**-0.5
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = torch.nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = torch.nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = torch.nn.Sequential(SwiGLU(), torch.nn.Linear(dim * ff_mult, dim, bias=False))
        # a cache the training forward fills: non-persistent, so not a weight
        self.register_buffer("pos_emb", torch.randn(300, dim_head), persistent=False)


class CrossAttention(Tripwire):
    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.context_norm = torch.nn.Identity()
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, ff_mult * dim * 2, bias=False), SwiGLU(),
                                      torch.nn.Linear(ff_mult * dim, dim, bias=False))  # fmt: skip


class Cross_model(Tripwire):  # Kwai's name
    def __init__(self, dim, layer_num, dim_head, heads, ff_mult):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                                 Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num)
        )  # fmt: skip


def _xclip():
    from transformers import CLIPModel as HFCLIPModel

    class XCLIPModel(Tripwire, HFCLIPModel):
        pass

    return XCLIPModel


class CLIPModel(Tripwire):
    def __init__(self, config):
        super().__init__()
        self.model = XCLIP(config)
        f = FUSION
        self.cross_model = Cross_model(f["dim"], f["layers"], f["dim_head"], f["heads"], f["ff_mult"])


XCLIP = _xclip()
KWAI = {
    "trainer.models.cross_modeling": [LayerNorm, Residual, RotaryEmbedding, SwiGLU, ParallelTransformerBlock,
                                      CrossAttention, Cross_model],
    "trainer.models.clip_model": [XCLIP, CLIPModel],
}  # fmt: skip


class Unimportable(types.ModuleType):
    def __getattr__(self, name):
        raise KwaiCodeRan(f"{self.__name__}.{name} was looked up")


def save_release(path, monkeypatch, dtype: torch.dtype = torch.float32) -> CLIPModel:
    """Write a tiny MPS release, ``torch.save(model)`` of Kwai's classes, then make those modules unimportable."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    for name in ("trainer", "trainer.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name, classes in KWAI.items():
        module = types.ModuleType(name)
        for cls in classes:
            cls.__module__, cls.__qualname__ = name, cls.__name__
            setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, name, module)
    tok = tiny_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="gelu")  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    with torch.no_grad():
        for name, p in model.cross_model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
        for name, b in model.cross_model.named_buffers():
            if name.endswith("norm.bias"):
                b.copy_(0.1 * torch.randn_like(b))  # zeros in Kwai's code; random here to check it is carried
        model.model.logit_scale.fill_(np.log(50.0))
        # distinct token features, so that the condition mask drops some prompt tokens
        model.model.text_model.embeddings.token_embedding.weight.normal_(0, 1.0)
    torch.save(model.to(dtype).eval(), path)
    for name in ("trainer", "trainer.models", *KWAI):
        monkeypatch.setitem(sys.modules, name, Unimportable(name))
    return model


def processor_folder(folder):
    from transformers import CLIPImageProcessor

    tiny_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def converted_release(tmp_path, monkeypatch, dtype: torch.dtype = torch.float32):
    model = save_release(tmp_path / "MPS_overall_checkpoint.pth", monkeypatch, dtype)
    with pytest.raises(KwaiCodeRan):  # the usual load resolves the pickled classes first: Kwai's code
        pickle.Unpickler(io.BytesIO(b"")).find_class("trainer.models.clip_model", type(model).__name__)
    folder = convert(tmp_path / "MPS_overall_checkpoint.pth", tmp_path / "mps", processor_folder(tmp_path / "proc"))
    return model, folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the release runs in float16
def test_the_converter_runs_no_release_code_and_keeps_every_weight(tmp_path, monkeypatch, dtype):
    model, folder = converted_release(tmp_path, monkeypatch, dtype)
    converted = load_file(folder / "model.safetensors")
    original = {k: v for k, v in model.model.state_dict().items() if not k.endswith("position_ids")}
    assert set(converted) == set(original)
    assert all(converted[k].dtype == dtype and torch.equal(converted[k], v) for k, v in original.items())
    fusion = load_file(folder / "fusion.safetensors")
    kwai = model.cross_model.state_dict()  # the cache pos_emb is not in it: non-persistent
    assert len(fusion) == len(kwai) == 13 * FUSION["layers"]
    for key, value in kwai.items():
        layer, rest = key.removeprefix("layers.").split(".", 1)
        assert torch.equal(fusion[f"layers.{layer}.{FUSION_RENAMES[rest]}"], value), key
    assert (folder / "fusion.json").read_text().replace(" ", "").replace("\n", "") == (
        '{"dim":16,"layers":2,"heads":2,"dim_head":8,"ff_mult":2}'
    )


class Payload:
    def __reduce__(self):
        return (print, ("executed",))


class Hooked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.hook = Payload()


def test_a_pickle_that_calls_anything_else_is_refused(tmp_path, capsys):
    torch.save(Hooked(), tmp_path / "MPS_overall_checkpoint.pth")
    with pytest.raises(UnsafeCheckpoint, match=r"calls (__builtin__|builtins)\.print, which is not a torch"):
        load_inert(tmp_path / "MPS_overall_checkpoint.pth")
    assert main([str(tmp_path / "MPS_overall_checkpoint.pth"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr()
    assert "executed" not in err.out and err.err.count("\n") == 1 and "print" in err.err
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pth")  # a plain torch module is no MPS model
    assert main([str(tmp_path / "linear.pth"), str(tmp_path / "out")]) == 1
    assert "no module model" in capsys.readouterr().err


def rope(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Kwai's apply_rotary_pos_emb with rotate_half."""
    t1, t2 = t.unflatten(-1, (2, -1)).unbind(dim=-2)
    return t * pos.cos() + torch.cat([-t2, t1], dim=-1) * pos.sin()


def reference_fusion(sd: dict[str, torch.Tensor], image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    """Kwai's Cross_model forward on its own tensor names, for a batch of one (einsum as in its code)."""
    heads, dim_head = FUSION["heads"], FUSION["dim_head"]
    x = image
    for i in range(FUSION["layers"]):
        c, b = f"layers.{i}.0.fn.", f"layers.{i}.1.fn."
        h = F.layer_norm(x, x.shape[-1:], sd[c + "norm.weight"], sd[c + "norm.bias"])
        q = (h @ sd[c + "to_q.weight"].T).view(1, -1, heads, dim_head).permute(0, 2, 1, 3) * dim_head**-0.5
        k, v = (text @ sd[c + "to_kv.weight"].T).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(1, -1, heads * dim_head)
        ff_val, ff_gate = (h @ sd[c + "ff.0.weight"].T).chunk(2, dim=-1)
        x = out @ sd[c + "to_out.weight"].T + (F.silu(ff_gate) * ff_val) @ sd[c + "ff.2.weight"].T + x

        h = F.layer_norm(x, x.shape[-1:], sd[b + "norm.weight"], sd[b + "norm.bias"])
        split = (heads * dim_head, dim_head, dim_head, 2 * FUSION["ff_mult"] * FUSION["dim"])
        q, k, v, ff = (h @ sd[b + "fused_attn_ff_proj.weight"].T).split(split, dim=-1)
        q = q.view(1, -1, heads, dim_head).permute(0, 2, 1, 3)
        freqs = torch.einsum("i,j->ij", torch.arange(x.shape[1]).float(), sd[b + "rotary_emb.inv_freq"])
        pos = torch.cat([freqs, freqs], dim=-1)

        q, k = rope(q, pos) * dim_head**-0.5, rope(k, pos)
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(1, -1, heads * dim_head)
        ff_val, ff_gate = ff.chunk(2, dim=-1)
        x = out @ sd[b + "attn_out.weight"].T + (F.silu(ff_gate) * ff_val) @ sd[b + "ff_out.1.weight"].T + x
    return x


def pixels_of(seed: int) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


class FixedImages:
    """The eval job's image source: image i is seeded noise (the metric, not a generator, is under test)."""

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.cat([pixels_of(s) for s in seeds])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_eval_jobs_mps_equals_the_reference_formula(tmp_path, monkeypatch, dtype):
    model, folder = converted_release(tmp_path, monkeypatch, dtype)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = Config()
    cfg.eval.prompts, cfg.eval.num_images, cfg.eval.batch_size = str(tmp_path / "prompts.txt"), 7, 3
    cfg.eval.metrics, cfg.eval.weights = ["mps"], {"mps": str(folder)}
    values, skipped = measure(cfg, FixedImages(), torch.device("cpu"))
    assert not skipped

    # direct: Kwai's infer_one_sample for each (image, prompt), on the in-memory release (in float32, as the metric)
    clip, fusion = model.model.float().eval(), model.cross_model.float().state_dict()
    tok = tiny_clip_tokenizer()

    def tokens(text: str) -> torch.Tensor:
        return tok(text, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids  # fmt: skip

    def text_features(ids):
        out = clip.text_model(input_ids=ids)
        return clip.text_projection(out.last_hidden_state), clip.text_projection(out.pooler_output)

    scores, kept = [], []
    with torch.no_grad():
        for i in range(7):
            text_f, text_eos = text_features(tokens(PROMPTS[i % 4]))
            image_f = clip.visual_projection(
                clip.vision_model(pixel_values=((pixels_of(cfg.eval.seed + i) + 1) / 2 - CLIP_MEAN) / CLIP_STD)[0]
            )
            condition_f, _ = text_features(tokens(CONDITION))
            sim = torch.einsum("bid,bjd->bji", text_f, condition_f).max(dim=1, keepdim=True)[0]
            sim = sim / sim.max()
            mask = torch.where(sim > 0.3, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
            kept.append(float((mask[0, 0] == 0).float().mean()))
            fused = reference_fusion(fusion, image_f, text_f, mask)[:, 0, :]
            fused, text_eos = fused / fused.norm(dim=-1, keepdim=True), text_eos / text_eos.norm(dim=-1, keepdim=True)
            scores.append(float((clip.logit_scale.exp() * text_eos @ fused.T)[0, 0]))
    assert 0 < min(kept) and max(kept) < 1  # the condition mask keeps some prompt tokens and drops others
    assert np.std(scores) > 1e-2  # the images are told apart
    assert values["mps"] == pytest.approx(float(np.mean(scores)), rel=1e-5, abs=1e-6)
