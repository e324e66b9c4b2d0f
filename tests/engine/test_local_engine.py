"""LocalEngine: optimizer steps, frozen context, exact EMA pull, save/load round trip."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flashdmd.engine.base import OptimSpec
from flashdmd.engine.local import LocalEngine


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        self.register_buffer("counter", torch.tensor([float(seed)]))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def make_engine(freeze_body: bool = False) -> LocalEngine:
    g, f, d = Net(0), Net(1), Net(2)
    if freeze_body:
        d.body.requires_grad_(False)
    eng = LocalEngine()
    spec = OptimSpec(lr=1e-2, warmup_steps=2, grad_clip=1.0)
    eng.setup({"generator": g, "fake_score": f, "discriminator": d}, {k: spec for k in ("generator", "fake_score", "discriminator")},
              {"teacher": Net(3)})
    return eng


def train_steps(eng: LocalEngine, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for name in ("generator", "discriminator"):
            loss = eng[name](torch.randn(8, 3, generator=g)).pow(2).mean()
            eng.backward(name, loss)
            eng.step(name)


def test_ema_pull_is_exact():
    eng = make_engine()
    before_t = {k: v.clone() for k, v in eng["fake_score"].named_parameters()}
    src = {k: v.clone() for k, v in eng["generator"].named_parameters()}
    eng.ema_("fake_score", "generator", 0.9)
    for k, p in eng["fake_score"].named_parameters():
        assert torch.allclose(p, 0.9 * before_t[k] + 0.1 * src[k], atol=0, rtol=1e-6)
    eng.ema_("fake_score", "generator", 0.0)  # decay 0 copies
    for k, p in eng["fake_score"].named_parameters():
        assert torch.equal(p, src[k])


def test_step_applies_warmup_and_clipping():
    eng = make_engine()
    loss = eng["generator"](torch.randn(4, 3)).sum() * 1000
    eng.backward("generator", loss)
    stats = eng.step("generator")
    assert stats["lr"] == pytest.approx(0.5e-2)  # warm-up step 1 of 2
    assert stats["grad_norm"] > 1.0  # reported before clipping
    assert all(p.grad is None for p in eng["generator"].parameters())
    assert eng.step("generator")["lr"] == pytest.approx(1e-2)


def test_frozen_context_passes_input_gradients_but_collects_none():
    eng = make_engine()
    x = torch.randn(4, 3, requires_grad=True)
    with eng.frozen("discriminator"):
        eng["discriminator"](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in eng["discriminator"].parameters())
    assert all(p.requires_grad for p in eng["discriminator"].parameters())  # restored
    assert not any(p.requires_grad for p in eng["teacher"].parameters())  # frozen stays frozen


def test_frozen_backbone_is_not_optimised_or_checkpointed(tmp_path):
    eng = make_engine(freeze_body=True)
    body = eng["discriminator"].body.weight.clone()
    train_steps(eng, 3)
    assert torch.equal(eng["discriminator"].body.weight, body)
    eng.save(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "discriminator.safetensors")))
    assert keys == {"head.weight", "head.bias", "counter"}
    assert not (tmp_path / "teacher.safetensors").exists()


def test_save_load_round_trip_resumes_identically(tmp_path):
    eng = make_engine()
    train_steps(eng, 3)
    eng.save(tmp_path)
    json.loads((tmp_path / "generator.optim.json").read_text())  # plain JSON, nothing pickled
    train_steps(eng, 2, seed=1)
    expected = eng.full_state_dict("generator")

    other = make_engine()
    other.load(tmp_path)
    train_steps(other, 2, seed=1)
    got = other.full_state_dict("generator")
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    assert other.schedules["generator"].steps_done == 5


def test_errors_name_the_problem(tmp_path):
    eng = make_engine()
    with pytest.raises(KeyError, match="reference"):
        eng["reference"]
    with pytest.raises(KeyError, match="not a trainable"):
        eng.step("teacher")
    with pytest.raises(FileNotFoundError, match=r"no discriminator\.safetensors for trainable network"):
        eng.load(tmp_path)
    with pytest.raises(ValueError, match="no OptimSpec"):
        LocalEngine().setup({"generator": Net(0)}, {}, {})
