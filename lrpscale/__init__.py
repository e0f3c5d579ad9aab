"""lrpscale: Layer-wise Relevance Propagation for VGG classifiers over whole datasets.

The package follows the data flow (docs/architecture.md): ``inputs`` -> ``engine`` -> ``run``
(rows, the Ray audit) -> ``storage`` (Parquet) -> ``results`` (reducer) -> ``report``. The names
below load on first use, so a process that only decodes images or reads results (Ray's CPU
tasks, a pandas user's ``open_run``) does not load torch.
"""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["COMPOSITES", "Explainer", "Explanation", "ImageExplanation", "deconvolve", "explain_image",
           "load_model", "open_run", "__version__"]

_HOMES = {"COMPOSITES": "lrpscale.engine", "Explainer": "lrpscale.engine", "Explanation": "lrpscale.engine",
          "deconvolve": "lrpscale.engine.deconvolution", "load_model": "lrpscale.engine.models",
          "explain_image": "lrpscale.explain", "ImageExplanation": "lrpscale.explain",
          "open_run": "lrpscale.results"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lrpscale' has no attribute {name!r}")
