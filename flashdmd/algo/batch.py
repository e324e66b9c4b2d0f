"""One training iteration's input, as the data layer hands it to the stage-1/stage-2 steps."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from flashdmd.nets.interfaces import Conditioning


@dataclass
class Batch:
    """``cond``/``uncond``: the generator's prompts and their null conditioning (CFG of the real
    score); ``real``: real pixels for the discriminator (gmm2d: decoded true samples);
    ``size``: number of generator samples (the batch dimension of ``cond``);
    ``shares``: every rank's ``size`` in this iteration, the global batch's split (spec 1.9,
    flashdmd/algo/shares.py), with as many real images as prompts on every rank; empty when every
    rank has ``size`` (an even split: the losses need no reweighting)."""

    cond: Conditioning
    uncond: Conditioning
    real: Tensor
    size: int
    shares: tuple[int, ...] = ()
