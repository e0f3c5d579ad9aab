"""The LRP engine: rules, composites and the batched backward pass. Knows nothing of Ray or Parquet."""
from .composites import COMPOSITES, Composite, get_composite
from .explainer import Explainer, Explanation, ForwardRecord

__all__ = ["COMPOSITES", "Composite", "Explainer", "Explanation", "ForwardRecord", "get_composite"]
