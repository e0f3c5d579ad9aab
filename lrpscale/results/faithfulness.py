"""How faithful a run's heatmaps are, from its ``faithfulness`` table: AOPC per image and per class,
and the mean perturbation curves (docs/method.md §16).

The audit perturbs a seeded sample of the images (``analysis.faithfulness_sample``) and stores
every curve point: image_id, label, pred, composite, order (morf, lerf, random), step, fraction,
logit, prob. Here, per image and order, ``AOPC = logit(step 0) - mean(logit(steps 1..L))``, the
engine's definition; a class's AOPC is the mean over its sampled images, and its curve the mean
logit drop ``logit(step 0) - logit(step k)`` at each step. The table is read one committed file
at a time, so memory grows with the classes, not the images.
"""
from __future__ import annotations

import pandas as pd

from lrpscale.results.class_counts import BY, class_order
from lrpscale.storage.store import RunStore

ORDERS = ("morf", "lerf", "random")  # the engine's orders, in its order
COLUMNS = ["image_id", "label", "pred", "order", "step", "fraction", "logit"]
AOPC_COLUMNS = [*[f"aopc_{order}" for order in ORDERS], "morf_minus_random"]
CLASS_AOPC = ["by", "class", "images", *AOPC_COLUMNS]
CLASS_CURVES = ["by", "class", "order", "step", "fraction", "images", "drop"]
_TYPES = {"by": object, "class": object, "order": object, "images": "int64", "step": "int64", "fraction": "float64",
          "drop": "float64", **{name: "float64" for name in AOPC_COLUMNS}}


def image_aopc(points: pd.DataFrame) -> pd.DataFrame:
    """Curve points (columns of ``COLUMNS``, every point of each image and order present) -> one
    row per image and order: image_id, label, pred, order, aopc."""
    drops = _drops(points)
    later = drops[drops["step"] > 0]
    return (later.groupby(["image_id", "order"], sort=False, observed=True)
            .agg(label=("label", "first"), pred=("pred", "first"), aopc=("drop", "mean"))
            .reset_index()[["image_id", "label", "pred", "order", "aopc"]])


def mean_curves(points: pd.DataFrame, keys: tuple[str, ...] = ("order",)) -> pd.DataFrame:
    """Curve points of any number of images -> the mean logit drop per (``keys``, step): columns
    ``keys``, step, fraction, images, drop. An evaluation's table (one curve per image, method and
    order) takes ``keys=("method", "order")``."""
    drops = _drops(points, ("image_id", *keys))
    return (drops.groupby([*keys, "step"], sort=False).agg(fraction=("fraction", "first"), images=("drop", "size"),
                                                           drop=("drop", "mean")).reset_index())


def _drops(points: pd.DataFrame, curve: tuple[str, ...] = ("image_id", "order")) -> pd.DataFrame:
    """The points with ``drop`` = the step-0 logit of their curve (the columns ``curve`` name one)
    minus the point's logit."""
    start = points.loc[points["step"] == 0, [*curve, "logit"]].rename(columns={"logit": "logit0"})
    drops = points.merge(start, on=list(curve), how="inner", validate="many_to_one")
    drops["drop"] = drops["logit0"].astype("float64") - drops["logit"].astype("float64")
    return drops


def class_faithfulness(run: RunStore) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-class AOPC, per-class mean curves) of a run, both groupings (``by`` label and pred).

    AOPC: ``CLASS_AOPC`` columns, one row per (by, class): the sampled images, the mean AOPC of
    each order and ``morf_minus_random`` (how far the heatmap beats a random order; near 0 or
    below, its ranking of regions is not faithful). Curves: ``CLASS_CURVES`` columns, one row per
    (by, class, order, step): the mean logit drop. Empty frames for a run without curves (a
    sample of 0, or a run written before the table existed)."""
    aopc_parts, curve_parts = [], []
    for path in run.committed_files("faithfulness"):
        with run.parquet_file(path) as parquet:
            points = parquet.read(columns=COLUMNS).to_pandas()
        if points.empty:
            continue
        drops = _drops(points)
        per_image = image_aopc(points)
        for by in BY:
            aopc_parts.append(_with_class(per_image, by).groupby(["class", "order"]).agg(
                images=("aopc", "size"), sum=("aopc", "sum"))
                .reset_index().assign(by=by))
            curve_parts.append(_with_class(drops, by).groupby(["class", "order", "step"]).agg(
                fraction=("fraction", "first"), images=("drop", "size"), sum=("drop", "sum")).reset_index().assign(by=by))
    if not aopc_parts:
        return tuple(pd.DataFrame({c: pd.Series(dtype=_TYPES[c]) for c in columns}) for columns in (CLASS_AOPC, CLASS_CURVES))
    totals = pd.concat(aopc_parts).groupby(["by", "class", "order"])[["images", "sum"]].sum()
    wide = (totals["sum"] / totals["images"]).unstack("order").reindex(columns=list(ORDERS))
    wide.columns = [f"aopc_{order}" for order in ORDERS]
    wide.insert(0, "images", totals["images"].groupby(["by", "class"]).max())
    wide["morf_minus_random"] = wide["aopc_morf"] - wide["aopc_random"]
    curves = pd.concat(curve_parts).groupby(["by", "class", "order", "step"], as_index=False).agg(
        fraction=("fraction", "first"), images=("images", "sum"), sum=("sum", "sum"))
    curves["drop"] = curves["sum"] / curves["images"]
    return _sorted(wide.reset_index()[CLASS_AOPC]), _sorted(curves[CLASS_CURVES])


def _with_class(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """The rows with a value in column ``by``, with that value as the string column ``class`` (a
    prediction is named by its index, as the reducer names it)."""
    rows = frame[frame[by].notna()]
    return rows.assign(**{"class": rows[by].astype(str)})


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by grouping, class (as ``class_order`` sorts names), order (MoRF, LeRF, random), step."""
    keys = {"class": lambda c: c.map(class_order), "order": lambda c: c.map(ORDERS.index)}
    columns = [c for c in ("by", "class", "order", "step") if c in frame]
    return frame.sort_values(columns, key=lambda c: keys.get(c.name, lambda v: v)(c), ignore_index=True)
