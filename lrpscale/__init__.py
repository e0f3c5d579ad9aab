"""lrpscale: Layer-wise Relevance Propagation for VGG classifiers over whole datasets."""
from .deconv import deconvolve
from .lrp import COMPOSITES, Explainer, Explanation
from .models import load_model

__version__ = "0.1.0"
__all__ = ["COMPOSITES", "Explainer", "Explanation", "deconvolve", "load_model", "__version__"]
