"""Results for pandas users: ``open_run``/``Run``, the reducer, class counts, comparison of runs
and class graphs.

Rule: pyarrow, pandas, numpy, networkx (and scikit-learn, scipy); no torch, no matplotlib, so
``from lrpscale.results import open_run`` loads in a second.
"""
from lrpscale.results.run import Run, open_run

__all__ = ["Run", "open_run"]
