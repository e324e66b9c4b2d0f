"""Seeds derived from (seed, step[, rank]) so every run, rank and resume draws the same numbers.

Control-flow choices (which student step, RL or DM) use ``control_rng(seed, step)``: identical on
all ranks, or collectives would hang (DESIGN.md). Data noise uses ``noise_generator(seed, step,
rank)``: different per rank, so ranks do not duplicate samples. Both are pure functions of their
arguments, so a resumed run repeats exactly what an uninterrupted one would have drawn.
"""
from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def control_rng(seed: int, step: int, tag: str = "control") -> random.Random:
    return random.Random(derive_seed(seed, step, tag))


def noise_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu",
                    tag: str = "noise") -> torch.Generator:
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(derive_seed(seed, step, rank, tag))
    return gen
