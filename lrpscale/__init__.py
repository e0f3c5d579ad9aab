"""lrpscale: Layer-wise Relevance Propagation for VGG classifiers over whole datasets.

The engine's names are loaded on first use, so processes that only decode images (Ray's CPU
tasks import ``lrpscale.data``) do not load torch.
"""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["COMPOSITES", "Explainer", "Explanation", "deconvolve", "load_model", "__version__"]

_HOMES = {"COMPOSITES": ".lrp", "Explainer": ".lrp", "Explanation": ".lrp", "deconvolve": ".deconv",
          "load_model": ".models"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module 'lrpscale' has no attribute {name!r}")
