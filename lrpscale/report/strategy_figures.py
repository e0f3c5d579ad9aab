"""Pictures of a class's prediction strategies (SpRAy, docs/method.md §18): the Laplacian's
smallest eigenvalues with the eigengap that set the number of clusters, and the t-SNE layout of
the class's images coloured by cluster.

Built as ``matplotlib.figure.Figure`` objects directly, never through pyplot (as in
``lrpscale.report.figures``). The inputs are rows of ``Run.strategy_classes`` and
``Run.strategies``. Cluster c is drawn in ``cluster_colour(c)`` everywhere, so the page can frame
a cluster's pictures in the colour of its points.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CLUSTER_COLOURS = [to_hex(colour) for colour in colormaps["tab10"].colors]


def cluster_colour(cluster: int) -> str:
    """The colour of cluster ``cluster`` (0 the largest) as #rrggbb; ten colours, then repeated."""
    return CLUSTER_COLOURS[int(cluster) % len(CLUSTER_COLOURS)]


def draw_spectrum(ax, eigenvalues, clusters: int, eigengap: float | None = None, max_clusters: int | None = None) -> None:
    """The ascending Laplacian eigenvalues lambda_1, lambda_2, ... against their index on ``ax``.

    A near-zero eigenvalue per group of images that the neighbour graph keeps apart; the chosen
    number of clusters c sits before the largest gap lambda_{c+1} - lambda_c (marked and written
    in the corner when ``eigengap`` is finite). max_clusters: the last c the gap was looked for
    (a dotted line after it).
    """
    values = np.asarray(eigenvalues, np.float64)
    index = np.arange(1, values.size + 1)
    ax.plot(index, values, "-", color="#7f8c8d", linewidth=0.8)
    ax.plot(index, values, "o", color="#263238", markersize=3)
    gap = eigengap is not None and math.isfinite(eigengap) and 1 <= clusters < values.size
    if gap:
        ax.plot([clusters, clusters + 1], values[[clusters - 1, clusters]], "o", color="#c0392b", markersize=5)
        ax.annotate("", xy=(clusters + 0.5, values[clusters]), xytext=(clusters + 0.5, values[clusters - 1]),
                    arrowprops={"arrowstyle": "<->", "color": "#c0392b", "linewidth": 1.0})
    text = (f"{clusters} clusters at the largest gap ({eigengap:.3g})" if gap else
            f"{clusters} cluster{'s' if clusters != 1 else ''}: no gap to read")
    ax.text(0.98, 0.04, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
            color="#c0392b" if gap else "#555555", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none"})
    if max_clusters is not None and max_clusters + 1 < values.size:
        ax.axvline(max_clusters + 0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("e (ascending)", fontsize=8)
    ax.set_ylabel(r"Laplacian eigenvalue $\lambda_e$", fontsize=8)
    ax.set_xlim(0.3, max(values.size, 2) + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, linewidth=0.5)


def draw_embedding(ax, x, y, cluster) -> None:
    """The class's images at their t-SNE positions, coloured by cluster, with a legend of the
    cluster sizes; images without a position (outside the sample of a capped class) are counted
    in the corner, not drawn."""
    x, y, cluster = (np.asarray(values) for values in (x, y, cluster))
    placed = np.isfinite(x) & np.isfinite(y)
    found, sizes = np.unique(cluster, return_counts=True)
    small = placed.sum() > 400  # big classes: smaller dots, so that the clusters' shapes show
    for label, size in zip(found, sizes):
        mine = placed & (cluster == label)
        ax.scatter(x[mine], y[mine], s=4 if small else 14, color=cluster_colour(label), alpha=0.8, linewidths=0,
                   label=f"{label} ({size})")
    if (~placed).any():
        ax.text(0.98, 0.02, f"{int((~placed).sum())} images outside the sample not drawn", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=6.5, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE of the features", fontsize=8)
    # beside the axes: inside, the legend would hide points
    ax.legend(title="cluster\n(images)", title_fontsize=7, fontsize=6.5, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              frameon=False, markerscale=1.5 if small else 1.0)


def class_strategies_figure(eigenvalues, clusters: int, eigengap: float | None, x, y, cluster,
                            max_clusters: int | None = None, title: str | None = None) -> Figure:
    """Two panels of one class: the eigenvalues (``draw_spectrum``) and the t-SNE layout coloured
    by cluster (``draw_embedding``)."""
    fig = Figure(figsize=(8.6, 3.0), layout="constrained")
    spectrum_ax, embedding_ax = fig.subplots(1, 2, width_ratios=[1.0, 1.2])
    draw_spectrum(spectrum_ax, eigenvalues, clusters, eigengap, max_clusters)
    spectrum_ax.set_title("eigenvalues of the neighbour graph", fontsize=9)
    draw_embedding(embedding_ax, x, y, cluster)
    embedding_ax.set_title("images by cluster", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
