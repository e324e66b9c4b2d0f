"""Evaluation metrics on prompt sets: a registry, the metrics, the results table.

Importing this package registers every metric in ``flashdmd.eval.metrics.REGISTRY``.
"""

from flashdmd.eval import clip_score, fid, image_reward, mps  # noqa: F401  (registration)
from flashdmd.eval.metrics import REGISTRY, Metric, MetricUnavailable, build_metrics
from flashdmd.eval.table import results_table

__all__ = ["REGISTRY", "Metric", "MetricUnavailable", "build_metrics", "results_table"]
