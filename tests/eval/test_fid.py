"""Inception FID and the CLIP-feature distance, with a random-weight FID Inception saved in the
release's state-dict layout: the eval metric equals torchmetrics' FrechetInceptionDistance on the same
images and weights, the reference set reads from a folder, a list file or saved statistics, and a
pickle that is not a plain state dict is refused."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_metric_models import fid_inception_weights

if importlib.util.find_spec("torch_fidelity") is None:  # installed is enough: its __init__ may need torchvision
    pytest.skip("Inception FID needs torch-fidelity (pip install --no-deps torch-fidelity)", allow_module_level=True)

from flashdmd.config import EvalConfig
from flashdmd.eval import build_metrics
from flashdmd.eval.fid import save_reference_stats
from flashdmd.eval.inception import inception_class, weights_only_loads

N = 4
PROMPTS = ["a cat"] * N


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return fid_inception_weights(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


def image_sets(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 sets [N, H, W, 3] with different statistics: noise, and brighter smooth ramps with noise."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (N, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.uniform(100, 200, (N, 1, 1, 3))
    ramps = np.clip(ramp + 40 + rng.normal(0, 20, (N, size, size, 3)), 0, 255).astype(np.uint8)
    return noise, ramps


def as_input(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.slow  # 24 forwards of the full-size Inception on the CPU
def test_inception_fid_matches_torchmetrics(inception, tmp_path):
    pytest.importorskip("torchmetrics")
    inception_class()  # torch-fidelity importable before torchmetrics looks for it
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake, real = image_sets()
    (tmp_path / "ref").mkdir()
    for i, array in enumerate(real):
        Image.fromarray(array).save(tmp_path / "ref" / f"{i:03d}.png")
    cfg = EvalConfig(metrics=["fid"], weights={"fid": str(inception)}, reference_images=str(tmp_path / "ref"))
    metrics, skipped = build_metrics(cfg)
    assert not skipped
    metrics["fid"].update(as_input(fake[:2]), PROMPTS[:2])  # batches of any split
    metrics["fid"].update(as_input(fake[2:]), PROMPTS[2:])
    ours = metrics["fid"].compute()

    with weights_only_loads():  # antialias=False: torch-fidelity's (and TF's) resize, not torchmetrics' default
        reference = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=str(inception), antialias=False
        )
    reference.set_dtype(torch.float64)
    reference.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    reference.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    expected = float(reference.compute())
    assert expected > 0 and ours == pytest.approx(expected, rel=1e-3)

    # the reference set as a list file, through its saved statistics, gives the same number: the
    # statistics are read from the list (reference_files), and a list or a folder reaches the same
    # reference_stats computation as the folder above, so one run covers both
    (tmp_path / "ref.txt").write_text("".join(f"ref/{i:03d}.png\n" for i in range(N)))
    npz = save_reference_stats("fid", tmp_path / "ref.txt", tmp_path / "ref.npz", str(inception))
    again, _ = build_metrics(EvalConfig(metrics=["fid"], weights={"fid": str(inception)}, reference_images=str(npz)))
    again["fid"].update(as_input(fake), PROMPTS)
    assert again["fid"].compute() == pytest.approx(ours, rel=1e-6)


class Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_weights_that_are_not_a_state_dict_are_refused(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref" / "0.png")
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, tmp_path / "evil.pth")
    cfg = EvalConfig(
        metrics=["fid"], weights={"fid": str(tmp_path / "evil.pth")}, reference_images=str(tmp_path / "ref")
    )
    built, skipped = build_metrics(cfg)
    assert not built and "not the FID Inception state dict" in skipped["fid"]
    assert "executed" not in capsys.readouterr().out
    _, skipped = build_metrics(EvalConfig(metrics=["fid"], reference_images=str(tmp_path / "ref")))
    assert "eval.weights.fid" in skipped["fid"] and "weights-inception-2015-12-05" in skipped["fid"]
    _, skipped = build_metrics(EvalConfig(metrics=["fid"], reference_images=str(tmp_path / "missing.txt")))
    assert "does not exist" in skipped["fid"]
