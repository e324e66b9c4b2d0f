"""Memory savers change memory, not values: VAE decoder checkpointing (+ micro-batches) and SAM
checkpointing in training mode. Memory is the bytes autograd saves for backward (counted with
saved_tensors_hooks); values are outputs and input gradients, equal within fp32 rounding."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flashdmd.nets.discriminator import PixelGANDiscriminator, SamBackbone, check_mode_invariant
from flashdmd.nets.families import get_family
from flashdmd.nets.tiny import tiny_sam_config, tiny_vae
from flashdmd.nets.vae import VAEDecoder


def _saved_bytes_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[int, Tensor, Tensor]:
    """(bytes saved for backward by non-parameter tensors, output, d sum(out^2) / dx)."""
    x = x.clone().requires_grad_(True)
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    (out.float() ** 2).sum().backward()
    return sum(seen.values()), out.detach(), x.grad


def _assert_rounding_close(got: Tensor, want: Tensor) -> None:
    """Equal up to fp32 rounding: batched kernels sum in another order (relative error ~1e-7)."""
    error = float((got.double() - want.double()).norm() / want.double().norm())
    assert error < 1e-5, error


@pytest.fixture(scope="module")
def vae() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vae(get_family("tiny-sdxl")).requires_grad_(False).eval()


def test_decoder_checkpointing_saves_less_and_changes_nothing(vae: nn.Module) -> None:
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = _saved_bytes_and_grad(VAEDecoder(vae), z)
    blocks = _saved_bytes_and_grad(VAEDecoder(vae, checkpointing=True), z)
    vae.disable_gradient_checkpointing()
    chunks = _saved_bytes_and_grad(VAEDecoder(vae, slice_size=1, checkpointing=True), z)
    vae.disable_gradient_checkpointing()
    assert blocks[0] < plain[0] / 2, (blocks[0], plain[0])
    assert chunks[0] < blocks[0], (chunks[0], blocks[0])  # forward keeps only each chunk's latents
    for bytes_, out, grad in (blocks, chunks):
        _assert_rounding_close(out, plain[1])
        _assert_rounding_close(grad, plain[2])


def test_micro_batches_alone_change_nothing(vae: nn.Module) -> None:
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    _, whole, grad = _saved_bytes_and_grad(VAEDecoder(vae), z)
    _, sliced, sliced_grad = _saved_bytes_and_grad(VAEDecoder(vae, slice_size=2), z)
    _assert_rounding_close(sliced, whole)
    _assert_rounding_close(sliced_grad, grad)


def _sam(**overrides: float) -> SamBackbone:
    from transformers import SamVisionModel

    torch.manual_seed(3)
    config = tiny_sam_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return SamBackbone(SamVisionModel(config))


def test_sam_checkpointing_runs_in_train_mode_and_changes_nothing() -> None:
    plain = PixelGANDiscriminator(_sam(), 32)
    ckpt = PixelGANDiscriminator(_sam(), 32)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.backbone.enable_checkpointing()
    for d in (plain, ckpt):
        d.eval()  # what freeze() and the engines do to a frozen backbone
    assert not plain.backbone.encoder.training and ckpt.backbone.encoder.training
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    feats_plain = plain.backbone.features(images)
    feats_ckpt = ckpt.backbone.features(images)
    for a, b in zip(feats_plain, feats_ckpt):
        assert torch.equal(a, b)  # training mode computes exactly what eval mode does
    base = _saved_bytes_and_grad(plain, images)
    recomputed = _saved_bytes_and_grad(ckpt, images)
    assert recomputed[0] < base[0] * 0.7, (recomputed[0], base[0])
    _assert_rounding_close(recomputed[1], base[1])
    _assert_rounding_close(recomputed[2], base[2])


def test_sam_checkpointing_refuses_an_encoder_with_dropout() -> None:
    backbone = _sam(attention_dropout=0.1)
    with pytest.raises(ValueError, match="engine.sam_checkpointing"):
        backbone.enable_checkpointing()
    check_mode_invariant(_sam().encoder)  # the stock SAM configs: no dropout, LayerNorm only
