"""Pictures of whether the heatmaps can be trusted (docs/method.md §16-17): region perturbation
curves against the random order, and the randomisation cascade.

Built as ``matplotlib.figure.Figure`` objects directly, never through pyplot (as in
``lrpscale.report.figures``). The inputs are the long tables of ``lrpscale.results``: mean curves
(``mean_curves`` or the reducer's ``faithfulness_curves``) and an evaluation's randomisation rows.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

ORDER_STYLE = {"morf": ("#c0392b", "-", "most relevant first (MoRF)"),
               "random": ("#7f8c8d", "--", "random order"),
               "lerf": ("#2c6fbb", ":", "least relevant first (LeRF)")}


def perturbation_curves_figure(curves: pd.DataFrame, panel: str | None = None, title: str | None = None,
                               aopc: Mapping[str, Mapping[str, float]] | None = None) -> Figure:
    """The mean drop of the target logit against the fraction of the image removed, one line per
    order (MoRF above random above LeRF is what a faithful heatmap gives).

    curves: rows with ``order``, ``fraction``, ``drop`` (and ``step``), one per order and step;
    with ``panel`` (e.g. "method"), one panel per value of that column, in order of appearance.
    aopc: {panel value: {order: AOPC}} written into each panel's legend.
    """
    groups = list(dict.fromkeys(curves[panel])) if panel else [None]
    columns = min(len(groups), 3)
    rows = math.ceil(len(groups) / columns)
    fig = Figure(figsize=(max(3.3 * columns, 5.5), 2.7 * rows + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False, sharey=True)).ravel()
    for ax, group in zip(axes, groups):
        rows_of = curves if group is None else curves[curves[panel] == group]
        for order, (color, style, name) in ORDER_STYLE.items():
            line = rows_of[rows_of["order"] == order].sort_values("step")
            if line.empty:
                continue
            score = (aopc or {}).get(group, {}).get(order)
            label = name if score is None else f"{name}, AOPC {score:.3g}"
            ax.plot(line["fraction"], line["drop"], style, color=color, marker="o", markersize=3, linewidth=1.4,
                    label=label)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("fraction of the image removed", fontsize=8)
        if group is not None:
            ax.set_title(str(group), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(fontsize=6.5, loc="best", frameon=False)
    axes[0].set_ylabel("mean drop of the target logit", fontsize=8)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def cascade_figure(checks: pd.DataFrame, title: str | None = None) -> Figure:
    """The randomisation cascade: mean |Spearman| of |heatmap| with the original's, against the
    layers randomised from the top (first tick: the top layer only), one line per method. A
    heatmap that depends on the model falls toward 0.

    checks: an evaluation's randomisation rows (``check``, ``method``, ``step``, ``layer``,
    ``value``); rows of other checks are ignored.
    """
    cascade = checks[checks["check"] == "cascade"].assign(absolute=lambda f: f["value"].abs())
    fig = Figure(figsize=(7.0, 3.0), layout="constrained")
    ax = fig.subplots()
    layers = cascade.groupby("step")["layer"].first().sort_index()
    for index, (method, rows) in enumerate(cascade.groupby("method", sort=False)):
        line = rows.groupby("step")["absolute"].agg(["mean", "std"]).sort_index()
        ax.plot(line.index, line["mean"], marker="o", markersize=3, linewidth=1.4, color=f"C{index}", label=method)
        ax.fill_between(line.index, (line["mean"] - line["std"]).clip(lower=0), line["mean"] + line["std"],
                        color=f"C{index}", alpha=0.12, linewidth=0)
    ax.set_xticks(layers.index, [str(layer) for layer in layers], rotation=60, ha="right", fontsize=6.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("randomised down to layer (top first)", fontsize=8)
    ax.set_ylabel("mean |Spearman| with the original", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=7, loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
