"""MPS (Kwai's Multi-dimensional Preference Score, Zhang et al. 2024), spec section 5 column "MPS".

Not implemented: MPS is a CLIP-H backbone with its own condition-aware cross-attention fusion
(``MPS_overall_checkpoint.pth``, a pickle).  There is no transformers class for it and flashdmd
does not unpickle untrusted files, so the metric is registered to name itself in the results table
and in the skip message, and is always skipped until a safetensors port exists.
"""

from __future__ import annotations

import torch

from flashdmd.config import EvalConfig
from flashdmd.eval.metrics import Metric, MetricUnavailable, register


@register("mps", "", "MPS", "Kwai MPS overall score (not implemented)", digits=2, needs_source=False)
def build_mps(source: str, device: torch.device, cfg: EvalConfig) -> Metric:
    raise MetricUnavailable(
        "MPS needs Kwai's own model code and a pickled checkpoint; flashdmd has no safetensors port of it yet"
    )
