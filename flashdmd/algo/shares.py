"""The global batch split over ranks, and the loss weights that keep an uneven split exact (spec 1.9).

Spec 1.9 states the batch as a global size (SDXL 64, SD3 32; the sdxl-8step preset 48), and the
GPU count need not divide it (48 over 32 GPUs). Rank r of W gets floor(B / W) samples, the first
B % W ranks one more; every rank computes every rank's share from the config, so no collective
is needed. Fewer samples than ranks is an error: a rank with an empty batch has no mean to take.

Every engine averages gradients over ranks (DDP, FSDP2 and ZeRO-3 all reduce sum / W). A loss that
is a per-sample mean over rank r's n_r samples then contributes grad(mean_r) / W, which is the mean
over the global batch only when every n_r is equal. Scaling rank r's mean by n_r W / N (N = sum of
all n_r) makes the average sum_r (n_r / N) grad(mean_r): exactly the gradient of the mean over all
N samples, for any split. The paper only states global batch sizes; the per-rank split is ours.
"""
from __future__ import annotations

from collections.abc import Sequence


def split_batch(total: int, world_size: int) -> list[int]:
    """Every rank's share of ``total`` samples: floor(total / W), the first total % W ranks one more."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    if total < world_size:
        raise ValueError(f"a batch of {total} samples leaves ranks of a world of {world_size} without a sample")
    base, extra = divmod(total, world_size)
    return [base + 1 if r < extra else base for r in range(world_size)]


def mean_weight(counts: Sequence[int], rank: int) -> float:
    """The factor for rank ``rank``'s per-sample mean over ``counts[rank]`` samples such that the
    ranks' averaged gradient is the mean over all ``sum(counts)`` samples: n_r W / N (1.0 when even)."""
    total = sum(counts)
    if total <= 0 or not 0 <= rank < len(counts):
        raise ValueError(f"no weight for rank {rank} of per-rank counts {list(counts)}")
    return counts[rank] * len(counts) / total
