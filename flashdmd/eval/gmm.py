"""Exact quality metrics for the 2-D toy world (DESIGN.md toy world 1).

- sliced Wasserstein-2 distance between two equal-size point sets (random unit directions,
  sorted 1-D projections, root of the mean squared gap over directions and points);
- per-mode mass: the fraction of samples whose nearest mixture mean is each mode;
- modes covered: modes holding at least half of their true weight;
- mean reward of a reward model at t = 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sliced_w2(x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """SW2 between samples ``x`` and ``y`` of shape (n, d) (equal n)."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"sliced_w2 needs two (n, d) sets of equal size, got {tuple(x.shape)} and {tuple(y.shape)}")
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # (directions, n) rows sorted by numpy: ~10x faster than torch.sort on one CPU thread
    px = np.sort((dirs.T @ x.double().cpu().T).numpy(), axis=1)
    py = np.sort((dirs.T @ y.double().cpu().T).numpy(), axis=1)
    return float(np.sqrt(((px - py) ** 2).mean()))


def mode_mass(x: Tensor, means: Tensor) -> Tensor:
    """Fraction of samples nearest to each mean, shape (M,)."""
    nearest = torch.cdist(x.float().cpu(), means.float().cpu()).argmin(dim=1)
    return torch.bincount(nearest, minlength=len(means)).double() / len(x)


def modes_covered(mass: Tensor, weights: Tensor) -> int:
    """Number of modes holding at least half of their true mass."""
    return int((mass >= 0.5 * weights.double().cpu()).sum())
