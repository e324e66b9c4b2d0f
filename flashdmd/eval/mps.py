"""MPS (Kwai's Multi-dimensional Preference Score, Zhang et al. 2024), spec section 5 column "MPS".

Not implemented: MPS is a CLIP-H backbone with its own condition-aware cross-attention fusion, and
its release (``MPS_overall_checkpoint.pth``) is a whole pickled model (``torch.save(model)``), not a
state dict: ``torch.load(weights_only=True)`` refuses it, and ``data_tools/safe_checkpoint.py`` names
the training-code classes loading it would import and run.  There is no PyPI package nor a
transformers class for the fusion, so the metric is registered to name itself in the results table
and in the skip message, and is always skipped until a port of that fusion exists.
"""

from __future__ import annotations

import torch

from flashdmd.config import EvalConfig
from flashdmd.eval.metrics import Metric, MetricUnavailable, register


@register("mps", "", "MPS", "Kwai MPS overall score (not implemented)", digits=2, needs_source=False)
def build_mps(source: str, device: torch.device, cfg: EvalConfig) -> Metric:
    raise MetricUnavailable(
        "MPS's release is a pickled model (it would run Kwai's training code to load) and flashdmd has no port "
        "of its condition-aware fusion yet"
    )
