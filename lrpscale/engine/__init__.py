"""The engine: VGG models, LRP rules and composites, the batched explainer, neuron selection and
the k sweep, critical paths, deconvolution, the Analyzer that runs the whole per-image method
(docs/method.md), and the checks of the heatmaps: faithfulness (region perturbation) and
randomisation. Tensors in, tensors and small Python records out.

Rule: imports torch, torchvision, numpy, networkx, ``lrpscale.config`` and ``lrpscale.graph``;
never Ray, Arrow, Parquet or pandas (import-linter enforces it).
"""
from lrpscale.engine.composites import COMPOSITES, Composite, get_composite
from lrpscale.engine.explainer import Explainer, Explanation, ForwardRecord

__all__ = ["COMPOSITES", "Composite", "Explainer", "Explanation", "ForwardRecord", "get_composite"]
