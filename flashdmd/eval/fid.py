"""Frechet distances between the generated images' features and a reference image set (spec 4.4, 5).

Two metrics share the formula and the reference handling:

* ``fid``: Inception FID as the community computes it: the FID Inception-v3 of torch-fidelity (the
  network of torchmetrics' ``FrechetInceptionDistance``), 2048-d pool features of uint8 images
  (the sampler's output rounded as a saved PNG would be), weights from ``eval.weights.fid`` (a local
  file, see ``flashdmd.eval.inception``).  Column "FID".
* ``fd_clip``: the same distance on a CLIP vision model's projected image embeddings (clean-fid's
  "FD on CLIP features" variant); default weights ``openai/clip-vit-large-patch14`` [INF].  Column
  "FD-CLIP".

``frechet_distance`` is the FID formula (Heusel et al. 2017),
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the trace of the root taken as the
sum of the square roots of the eigenvalues of ``S1 S2`` (torchmetrics' form; the eigenvalues are
real and non-negative since ``S1 S2`` is similar to a PSD matrix, and are computed as those of the
symmetric ``S1^(1/2) S2 S1^(1/2)``), which stays finite when the covariances are singular (fewer
images than feature dimensions).

The reference set (``eval.reference_images``) is a folder of images, a text file listing image paths
(one a line, relative to the file's folder; ``data_tools/make_coco10k.py`` writes one), or an
``.npz`` holding ``mu``, ``sigma`` and ``features`` computed with the same feature network
(``save_reference_stats``).

Departures: the Flash-DMD paper reports no FID (spec 5); DMD2 reports clean-fid's FID at 512 px.
Here images reach the Inception at their own size (it resizes to 299 itself, TF1-style bilinear, as
torchmetrics and torch-fidelity do); resize them beforehand to match a 512 px protocol [INF].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flashdmd.config import EvalConfig
from flashdmd.eval.clip_score import ClipEncoder
from flashdmd.eval.inception import load_inception
from flashdmd.eval.metrics import Metric, MetricUnavailable, check_batch, register

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Features = Callable[[torch.Tensor], torch.Tensor]  # [N, 3, H, W] in [-1, 1] -> [N, D]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    # the eigenvalues of S1 S2 are those of the symmetric R S2 R with R = S1^(1/2) (AB and BA share
    # their non-zero eigenvalues; R R = S1, also when S1 is singular): two symmetric eigen-solves
    # instead of a general one, several times faster at 2048 dimensions
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def gaussian_from_sums(total: torch.Tensor, outer: torch.Tensor, count: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from the sum and the sum of outer products of n features."""
    if count < 2:
        raise ValueError(f"FID needs at least 2 images, got {int(count)}")
    mu = total.double() / count
    sigma = (outer.double() - count * torch.outer(mu, mu)) / (count - 1)
    return mu.numpy(), sigma.numpy()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [N, 3, H, W], rounded as a saved PNG would be."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_files(path: Path) -> list[Path]:
    """The reference images of a folder (sorted by name) or of a list file (one path a line)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        files = [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise MetricUnavailable(f"{len(missing)} image(s) of the list {path} do not exist, e.g. {missing[0]}")
    else:
        raise MetricUnavailable(f"eval.reference_images {str(path)!r} does not exist")
    if not files:
        raise MetricUnavailable(f"no images ({', '.join(IMAGE_SUFFIXES)}) in reference set {path}")
    return files


def load_image(path: Path) -> torch.Tensor:
    """One image file as a [3, H, W] tensor in [-1, 1] (exact on the uint8 grid)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def feature_sums(features: Features, files: list[Path], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum and sum of outer products of the features of ``files``, batching runs of equal-sized images."""
    total = outer = None
    start = 0
    while start < len(files):
        first = load_image(files[start])
        batch = [first]
        while len(batch) < batch_size and start + len(batch) < len(files):
            image = load_image(files[start + len(batch)])
            if image.shape != first.shape:
                break
            batch.append(image)
        feats = features(torch.stack(batch)).double().cpu()
        total = feats.sum(0) if total is None else total + feats.sum(0)
        outer = feats.T @ feats if outer is None else outer + feats.T @ feats
        start += len(batch)
    return total, outer, len(files)


def reference_stats(path: Path, features: Features, tag: str, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference set: from an .npz made with the same ``tag``, or computed from images."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            made_with = str(data["features"]) if "features" in data else ""
            if made_with != tag:
                raise MetricUnavailable(
                    f"{path} holds statistics of features {made_with or '(unnamed)'!r}, not {tag!r}: "
                    "recompute it with save_reference_stats and the same weights"
                )
            return data["mu"], data["sigma"]
    return gaussian_from_sums(*feature_sums(features, reference_files(path), batch_size))


class FrechetDistance(Metric):
    """Frechet distance of the generated images' features to the reference statistics."""

    def __init__(self, features: Features, reference: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.features = features
        self.reference = reference
        dim = reference[0].shape[0]
        self._state = {
            "sum": torch.zeros(dim, dtype=torch.float64),
            "outer": torch.zeros(dim, dim, dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.float64),
        }

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        check_batch(images, prompts)
        feats = self.features(images).double().cpu()
        self._state["sum"] += feats.sum(0)
        self._state["outer"] += feats.T @ feats
        self._state["count"] += feats.shape[0]

    def compute(self) -> float:
        mu, sigma = gaussian_from_sums(self._state["sum"], self._state["outer"], float(self._state["count"]))
        return frechet_distance(mu, sigma, *self.reference)


def inception_features(weights: str, device: torch.device, feature: str = "2048") -> tuple[Features, str]:
    """The FID Inception as a feature function of [-1, 1] images, and its tag for saved statistics."""
    model = load_inception(weights, device, feature)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        (out,) = model(to_uint8(images).to(device))
        return out

    return features, f"inception-{feature}:{Path(weights).name}"


def clip_features(source: str, device: torch.device) -> tuple[Features, str]:
    """A CLIP vision model's projected image embeddings as a feature function, and its tag."""
    encoder = ClipEncoder(source, device)
    return (lambda images: encoder.projected(encoder.pixels(images))), f"clip:{source}"


FEATURE_NETWORKS: dict[str, Callable[[str, torch.device], tuple[Features, str]]] = {
    "fid": inception_features, "fd_clip": clip_features,
}  # fmt: skip


def save_reference_stats(
    metric: str, reference: str | Path, out: str | Path, weights: str, device: str = "cpu"
) -> Path:
    """Write the .npz of a reference set's feature statistics (``metric`` "fid" or "fd_clip"), for reuse."""
    features, tag = FEATURE_NETWORKS[metric](weights, torch.device(device))
    mu, sigma = gaussian_from_sums(*feature_sums(features, reference_files(Path(reference)), 32))
    np.savez(out, mu=mu, sigma=sigma, features=np.array(tag))
    return Path(out)


def build_frechet(metric: str, source: str, device: torch.device, cfg: EvalConfig) -> FrechetDistance:
    if not cfg.reference_images:
        raise MetricUnavailable(
            "set eval.reference_images to a folder or list of reference images, or an .npz of their statistics"
        )
    reference = Path(cfg.reference_images).expanduser()
    if not reference.exists():
        raise MetricUnavailable(f"eval.reference_images {str(reference)!r} does not exist")
    features, tag = FEATURE_NETWORKS[metric](source, device)
    return FrechetDistance(features, reference_stats(reference, features, tag, cfg.batch_size))


@register("fid", "", "FID", "Inception FID (torch-fidelity's FID Inception, 2048-d pool features)", digits=2,
          needs_source=False)
def build_fid(source: str, device: torch.device, cfg: EvalConfig) -> FrechetDistance:
    return build_frechet("fid", source, device, cfg)


@register("fd_clip", "openai/clip-vit-large-patch14", "FD-CLIP", "Frechet distance on CLIP image features", digits=2)
def build_fd_clip(source: str, device: torch.device, cfg: EvalConfig) -> FrechetDistance:
    return build_frechet("fd_clip", source, device, cfg)
