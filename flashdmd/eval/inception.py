"""The FID Inception-v3 feature extractor, from torch-fidelity (the network torchmetrics' FID uses).

``load_inception`` builds torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow
2015-12-05 graph ported to PyTorch, TF1-compatible bilinear resize to 299 inside) from the standard
FID weights given as a local file: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
(the same state-dict layout as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``).  The file is
a plain state dict; torch-fidelity opens it with ``weights_only=False``, so construction runs under
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` and a file holding anything but tensors is refused, not executed.

torch-fidelity's package ``__init__`` imports torchvision (for its dataset helpers), which has no
build for the CPU torch of small machines; the extractor's own modules do not, so when torchvision
is missing they are imported without the package ``__init__`` (a bare package entry in
``sys.modules``: ``torch_fidelity.calculate_metrics`` is then unavailable in this process).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from flashdmd.eval.metrics import MetricUnavailable

INCEPTION_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = ("64", "192", "768", "2048")  # torch-fidelity's pooled feature taps; FID uses "2048"


def inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, importable with or without torchvision."""
    try:
        return importlib.import_module(INCEPTION_MODULE).FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise MetricUnavailable("Inception FID needs torch-fidelity: pip install torch-fidelity") from None
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]  # the half-imported package from the attempt above
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    return importlib.import_module(INCEPTION_MODULE).FeatureExtractorInceptionV3


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``, whatever its caller asked."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def load_inception(weights: str, device: torch.device, feature: str = "2048") -> torch.nn.Module:
    """The FID Inception with ``weights`` (a local state-dict file), returning ``feature``-dim features."""
    if feature not in FEATURES:
        raise ValueError(f"Inception feature {feature!r} is not one of {', '.join(FEATURES)}")
    path = Path(weights).expanduser()
    if not weights or not path.is_file():
        raise MetricUnavailable(
            f"set eval.weights.fid to the FID Inception weights file ({INCEPTION_FILE} from torch-fidelity's "
            f"releases, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth); {weights!r} is not a file"
        )
    cls = inception_class()
    try:
        with weights_only_loads():
            model = cls("inception-v3-compat", [feature], feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise MetricUnavailable(f"{path} is not the FID Inception state dict ({first})") from None
    return model.to(device)
