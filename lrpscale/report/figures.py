"""Pictures of explanations: heatmaps, restricted heatmaps across k, MSE/SMAPE curves, critical-path
graphs, deconvolutions, contact sheets, and the paper-like figure that composes them.

Every function builds a ``matplotlib.figure.Figure`` directly (rendered by Agg when saved), never
through pyplot: nothing global is touched, nothing is shown, and figures are freed with their last
reference, so worker processes and notebooks can call these functions freely. Arrays may be numpy
arrays or torch tensors (anything with ``.detach()``). Relevance is drawn with a diverging
colormap centred at 0 with symmetric limits: red is positive relevance, blue negative.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure, SubFigure
from matplotlib.gridspec import GridSpec
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from lrpscale.graph import OUTPUT, class_label, path_graph

RELEVANCE_CMAP = "bwr"
POSITIVE, NEGATIVE = "#c0392b", "#2c6fbb"
DPI = 130
NODE_AREA = (60.0, 600.0)  # points^2 of the weakest and the strongest node of a graph drawing
EDGE_WIDTH = (0.3, 4.0)  # points
VARIANT_STYLE = {"fidelity": "-", "forward_backward": "--"}


def as_array(values) -> np.ndarray:
    """A numpy array (float32 for floating input) from a numpy array, torch tensor or sequence."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def relevance_map(heatmap) -> np.ndarray:
    """(3, H, W) colour relevance or (H, W) -> (H, W), summed over colour channels (float32)."""
    array = as_array(heatmap).astype(np.float32)
    if array.ndim == 3:
        return array.sum(0)
    if array.ndim != 2:
        raise ValueError(f"a heatmap is (3, H, W) or (H, W), got shape {array.shape}")
    return array


def symmetric_limit(values, percentile: float = 99.5) -> float:
    """The colour limit L for relevance shown on [-L, L]: the given percentile of |values|.

    A percentile below 100 keeps a few extreme pixels (typical of LRP at borders) from washing out
    the rest. Falls back to max |values|, and to 1.0 for an all-zero or non-finite map, so the
    limit is always a positive finite number.
    """
    magnitudes = np.abs(as_array(values)).ravel()
    magnitudes = magnitudes[np.isfinite(magnitudes)]
    if magnitudes.size == 0:
        return 1.0
    limit = float(np.percentile(magnitudes, percentile))
    if limit <= 0:
        limit = float(magnitudes.max())
    return limit if limit > 0 else 1.0


def display_image(x, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """A model input or picture -> (H, W, 3) float in [0, 1] for ``imshow``.

    x: (3, H, W) normalised model input (pass the ``mean``/``std`` it was normalised with), or
    (H, W, 3) / (H, W) pixels, uint8 or float in [0, 1].
    """
    array = as_array(x)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if mean is not None and std is not None:
        array = array * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(array, 0.0, 1.0)


def normalize_picture(picture) -> np.ndarray:
    """(3, d, d) or (d, d, 3) reconstruction -> (d, d, 3) in [0, 1], min-max scaled per picture.

    A constant picture (e.g. a neuron that never fires) becomes mid-grey.
    """
    array = as_array(picture).astype(np.float32)
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    low, high = float(array.min()), float(array.max())
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 1e-12 * max(abs(low), abs(high), 1.0):
        return np.full(array.shape, 0.5, np.float32)
    return (array - low) / (high - low)


def heatmap_rgb(heatmap, limit: float | None = None, cmap: str = RELEVANCE_CMAP, image=None,
                opacity: float = 1.0) -> np.ndarray:
    """(3, H, W) or (H, W) relevance -> (H, W, 3) RGB float in [0, 1] (for HTML or PIL).

    limit: colour limit (default ``symmetric_limit``). image: optional (H, W, 3) display image in
    [0, 1] to overlay on; it is shown in grey where |relevance| is small and the heatmap colour
    takes over in proportion to |relevance| / limit (times ``opacity``).
    """
    values = relevance_map(heatmap)
    limit = limit or symmetric_limit(values)
    rgb = colormaps[cmap](Normalize(-limit, limit, clip=True)(values))[..., :3]
    if image is None:
        return rgb.astype(np.float32)
    grey = display_image(image).mean(-1, keepdims=True)
    weight = np.clip(np.abs(values) / limit, 0.0, 1.0)[..., None] * opacity
    return ((1 - weight) * grey + weight * rgb).astype(np.float32)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_heatmap(ax, heatmap, limit: float | None = None, image=None, title: str | None = None,
                 cmap: str = RELEVANCE_CMAP, colorbar: bool = False, opacity: float = 0.85):
    """Draw one relevance heatmap on ``ax``; returns the AxesImage.

    heatmap: (3, H, W) or (H, W). limit: symmetric colour limit (default ``symmetric_limit``;
    pass one limit to several panels to make their colours comparable). image: (H, W, 3) display
    image to overlay the heatmap on (see ``heatmap_rgb``). colorbar: add a colour bar beside ax.
    """
    values = relevance_map(heatmap)
    limit = limit or symmetric_limit(values)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    if image is None:
        shown = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    else:
        ax.imshow(heatmap_rgb(values, limit, cmap, image, opacity), interpolation="nearest")
        shown = ax.imshow(values, cmap=cmap, norm=norm, alpha=0.0)  # invisible: carries the colour bar
    _bare(ax)
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        bar.formatter = ScalarFormatter(useMathText=True)
        bar.formatter.set_powerlimits((-2, 3))
        bar.update_ticks()
    return shown


def heatmap_figure(heatmap, image=None, title: str | None = None, limit: float | None = None) -> Figure:
    """Figure of one explanation: [image | heatmap with colour bar | overlay], or the heatmap alone.

    heatmap: (3, H, W) or (H, W); image: (H, W, 3) display image in [0, 1] or uint8.
    """
    values = relevance_map(heatmap)
    limit = limit or symmetric_limit(values)
    panels = 1 if image is None else 3
    fig = Figure(figsize=(3.2 * panels, 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    if image is None:
        draw_heatmap(axes[0], values, limit, colorbar=True, title="relevance")
    else:
        axes[0].imshow(display_image(image))
        _bare(axes[0])
        axes[0].set_title("input", fontsize=9)
        draw_heatmap(axes[1], values, limit, colorbar=True, title="relevance")
        draw_heatmap(axes[2], values, limit, image=image, title="overlay")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw_restricted_heatmaps(fig: Figure | SubFigure, heatmaps, ks: Sequence[int], chosen_k: int | None = None,
                             limit: float | None = None) -> list:
    """Draw K heatmaps restricted to the top-k neurons of a layer as one row filling ``fig``.

    fig: a Figure or SubFigure. heatmaps: (K, 3, H, W) or (K, H, W), one per k of ``ks``. limit:
    shared colour limit (pass the full heatmap's so panels compare with it; default from all K
    maps). The panel of ``chosen_k`` is framed and its title bold. Returns the K axes.
    """
    maps = [relevance_map(h) for h in as_array(heatmaps)]
    limit = limit or symmetric_limit(np.stack(maps))
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    for ax, k, values in zip(axes, ks, maps):
        chosen = chosen_k is not None and int(k) == int(chosen_k)
        draw_heatmap(ax, values, limit, title=f"k = {k}" + (" (k*)" if chosen else ""))
        if chosen:
            ax.title.set_fontweight("bold")
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("black")
                spine.set_linewidth(2.0)
    return list(axes)


def restricted_heatmaps_figure(heatmaps, ks: Sequence[int], chosen_k: int | None = None,
                               limit: float | None = None, title: str | None = None) -> Figure:
    """Figure with one row of restricted heatmaps (K, 3, H, W) across ``ks``; see draw_restricted_heatmaps."""
    fig = Figure(figsize=(1.7 * len(ks) + 0.4, 2.3), layout="constrained")
    draw_restricted_heatmaps(fig, heatmaps, ks, chosen_k, limit)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _curve(values) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(K,) -> the curve; (N, K) -> (median, 25th, 75th percentile) over the N rows."""
    array = as_array(values).astype(np.float64)
    if array.ndim == 1:
        return array, None, None
    return np.median(array, 0), np.percentile(array, 25, 0), np.percentile(array, 75, 0)


def draw_score_curves(ax_mse, ax_smape, ks: Sequence[int], scores: Mapping[str, tuple],
                      chosen_k: int | None = None, score_target: float | None = None,
                      label: str | None = None, color: str | None = None) -> None:
    """MSE and SMAPE against k (log2 axis) on two axes, one line per score variant.

    scores: {variant: (mse, smape)} with each (K,) for one image or (N, K) for N images (then the
    median is drawn with a 25-75 percentile band). Variants are told apart by line style
    (fidelity solid, forward_backward dashed); call once per layer with its ``label`` and
    ``color`` to compare layers. chosen_k: marked with a dotted vertical line on both axes;
    score_target: the SMAPE target as a horizontal line. MSE is drawn on a log axis when it has
    positive values (zeros, e.g. k = all neurons, are left out there).
    """
    ks = np.asarray(ks, dtype=np.float64)
    positive_mse = False
    for index, (variant, (mse_values, smape_values)) in enumerate(scores.items()):
        style = VARIANT_STYLE.get(variant, ":")
        line_color = color or f"C{index}"
        name = variant.replace("_", "-") if label is None else f"{label} {variant.replace('_', '-')}"
        for ax, values in ((ax_mse, mse_values), (ax_smape, smape_values)):
            centre, low, high = _curve(values)
            shown = centre.copy()
            if ax is ax_mse:
                shown[shown <= 0] = np.nan
                positive_mse = positive_mse or bool(np.isfinite(shown).any())
            ax.plot(ks, shown, style, color=line_color, marker="o", markersize=3.5, linewidth=1.4, label=name)
            if low is not None:
                ax.fill_between(ks, low, high, color=line_color, alpha=0.15, linewidth=0)
    if positive_mse:
        ax_mse.set_yscale("log")
    for ax, name in ((ax_mse, "MSE"), (ax_smape, "SMAPE (%)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("k (top neurons kept)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        if chosen_k is not None:
            ax.axvline(chosen_k, color=color or "black", linestyle=":", linewidth=1.2)
    if chosen_k is not None:
        at_right = chosen_k >= ks.max()  # the label goes inside the axes, beside the line
        ax_smape.annotate(f"k* = {chosen_k}", xy=(chosen_k, 1.0), xycoords=("data", "axes fraction"),
                          xytext=(-3 if at_right else 3, -10), textcoords="offset points",
                          ha="right" if at_right else "left", fontsize=7, color=color or "black")
    if score_target is not None:
        ax_smape.axhline(score_target, color="grey", linestyle="--", linewidth=0.8)
        ax_smape.annotate(f"target {score_target:g}", xy=(0.0, score_target), xycoords=("axes fraction", "data"),
                          xytext=(3, 2), textcoords="offset points", ha="left", fontsize=7, color="grey")
    ax_smape.set_ylim(bottom=0)
    ax_smape.legend(fontsize=7, loc="best", frameon=False)


def score_curves_figure(ks: Sequence[int], scores: Mapping[str, tuple], chosen_k: int | None = None,
                        score_target: float | None = None, title: str | None = None) -> Figure:
    """Figure with MSE and SMAPE against k, side by side; arguments as in ``draw_score_curves``."""
    fig = Figure(figsize=(7.5, 3.0), layout="constrained")
    ax_mse, ax_smape = fig.subplots(1, 2)
    draw_score_curves(ax_mse, ax_smape, ks, scores, chosen_k, score_target)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def layer_order(layer: str) -> tuple:
    """Sort key of a layer name: features.N, then classifier.N, then anything else, output last."""
    if layer == OUTPUT:
        return (3, 0, layer)
    group, _, index = str(layer).rpartition(".")
    if index.isdigit():
        return ({"features": 0, "classifier": 1}.get(group, 2), int(index), layer)
    return (2, 0, str(layer))


def graph_layers(graph: nx.DiGraph) -> list[str]:
    """The layers of a path graph, bottom to top: edges point upwards; ties go by module order."""
    layers = nx.DiGraph()
    layers.add_nodes_from(layer for layer, _ in graph.nodes)
    layers.add_edges_from((a[0], b[0]) for a, b in graph.edges if a[0] != b[0])
    if nx.is_directed_acyclic_graph(layers):
        return list(nx.lexicographical_topological_sort(layers, key=layer_order))
    return sorted(layers.nodes, key=layer_order)


def _scaled(value: float, scale: float, smallest: float, largest: float) -> float:
    """|value| / scale mapped linearly onto [smallest, largest]; the middle when scale is 0."""
    if scale <= 0:
        return (smallest + largest) / 2
    return smallest + (largest - smallest) * min(abs(value) / scale, 1.0)


def draw_path_graph(ax, graph: nx.DiGraph, layers: Sequence[str] | None = None,
                    layer_labels: Mapping[str, str] | None = None,
                    class_names: Sequence[str] | None = None, max_per_layer: int = 8,
                    size_attr: str = "relevance", width_attr: str = "relevance", scale: str = "layer") -> None:
    """Draw a critical-path graph layer by layer, bottom (left) to top (right).

    graph: nodes (layer, neuron) with a numeric ``size_attr`` (and optionally ``rank``), edges with
    a numeric ``width_attr`` (as ``lrpscale.paths.path_graph`` builds, or a class graph with e.g.
    ``frequency``). Each layer is a column, its neurons ordered by rank (else by |size|), top
    first, labelled with the neuron index (the output node with its class name); at most
    ``max_per_layer`` per column, the rest counted under the column. Node area follows
    |size_attr|, edge width |width_attr|; red is positive, blue negative. scale: "layer" sizes
    nodes and edges relative to the largest in the same column / layer pair (relevance shrinks
    with depth, so this keeps every layer readable), "global" to the largest in the graph.
    layer_labels: module name -> label shown under its column (e.g. features.28 -> conv5_3).
    """
    if scale not in ("layer", "global"):
        raise ValueError(f"scale must be 'layer' or 'global', got {scale!r}")
    layer_labels = dict(layer_labels or {})
    layers = [l for l in (layers or graph_layers(graph)) if any(n[0] == l for n in graph.nodes)]
    if not layers:
        _bare(ax)
        ax.text(0.5, 0.5, "empty critical path", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    shown, hidden = {}, {}
    for layer in layers:
        members = [n for n in graph.nodes if n[0] == layer]
        members.sort(key=lambda n: (graph.nodes[n].get("rank", 0),
                                    -abs(float(graph.nodes[n].get(size_attr, 0.0))), n[1]))
        shown[layer], hidden[layer] = members[:max_per_layer], len(members) - len(members[:max_per_layer])
    tallest = max(len(m) for m in shown.values())
    position = {}
    for column, layer in enumerate(layers):
        count = len(shown[layer])
        for row, node in enumerate(shown[layer]):
            position[node] = (float(column), (count - 1) / 2.0 - row)
    sub = graph.subgraph(position)

    sizes = np.array([float(sub.nodes[n].get(size_attr, 0.0)) for n in sub.nodes])
    node_scale = {layer: max([abs(float(graph.nodes[n].get(size_attr, 0.0))) for n in shown[layer]] or [0.0])
                  for layer in layers}
    overall = max(node_scale.values())
    area = np.array([_scaled(value, node_scale[n[0]] if scale == "layer" else overall, *NODE_AREA)
                     for n, value in zip(sub.nodes, sizes)])
    node_colors = [POSITIVE if value >= 0 else NEGATIVE for value in sizes]

    edges = list(sub.edges)
    weights = np.array([float(sub.edges[e].get(width_attr, 0.0)) for e in edges])
    pair_scale = {}
    for (a, b), w in zip(edges, weights):
        pair_scale[(a[0], b[0])] = max(pair_scale.get((a[0], b[0]), 0.0), abs(w))
    edge_top = max(pair_scale.values(), default=0.0)
    strength = np.array([_scaled(w, pair_scale[(a[0], b[0])] if scale == "layer" else edge_top, 0.0, 1.0)
                         for (a, b), w in zip(edges, weights)])
    widths = EDGE_WIDTH[0] + (EDGE_WIDTH[1] - EDGE_WIDTH[0]) * strength
    edge_colors = [POSITIVE if w >= 0 else NEGATIVE for w in weights]
    alphas = 0.25 + 0.6 * strength  # faint edges recede, strong ones stand out

    if edges:
        nx.draw_networkx_edges(sub, position, edgelist=edges, ax=ax, width=widths, edge_color=edge_colors,
                               alpha=list(alphas), arrows=False)
    nodes = list(sub.nodes)
    nx.draw_networkx_nodes(sub, position, nodelist=nodes, ax=ax, node_size=area, node_color=node_colors,
                           edgecolors="white", linewidths=0.8, alpha=0.9)
    labels = {}
    for node in nodes:
        if node[0] == OUTPUT and class_names is not None and 0 <= node[1] < len(class_names):
            labels[node] = str(class_names[node[1]])
        else:
            labels[node] = str(node[1])
    nx.draw_networkx_labels(sub, position, labels=labels, ax=ax, font_size=7, font_color="black",
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    bottom = -(tallest - 1) / 2.0 - 0.45
    for column, layer in enumerate(layers):
        text = "class" if layer == OUTPUT else layer_labels.get(layer, layer)
        if hidden[layer]:
            text += f"\n(+{hidden[layer]} more)"
        ax.text(column, bottom, text, ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(bottom - 0.6, (tallest - 1) / 2.0 + 0.5)
    _bare(ax)


def path_graph_figure(graph: nx.DiGraph, title: str | None = None, **options) -> Figure:
    """Figure of a critical-path graph; ``options`` go to ``draw_path_graph``."""
    layers = options.get("layers") or graph_layers(graph)
    per_layer = options.get("max_per_layer", 8)
    tallest = max([min(per_layer, sum(1 for n in graph.nodes if n[0] == l)) for l in layers] or [1])
    fig = Figure(figsize=(max(5.0, 1.3 * len(layers) + 1), max(3.0, 0.55 * tallest + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    draw_path_graph(ax, graph, **options)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def draw_deconvolutions(fig: Figure | SubFigure, deconv: Mapping[str, tuple],
                        layer_labels: Mapping[str, str] | None = None, max_per_layer: int = 4) -> list:
    """Deconvolution reconstructions filling ``fig`` (a Figure or SubFigure): one column per layer
    (bottom to top), one row per neuron (rank 0 on top), each picture min-max scaled on its own.

    deconv: {layer: (neurons (J,), pictures (J, 3, d, d))} for one image. Returns the axes drawn.
    """
    layer_labels = dict(layer_labels or {})
    layers = sorted(deconv, key=layer_order)
    rows = max([min(max_per_layer, len(as_array(deconv[l][0]))) for l in layers] or [0])
    if rows == 0:
        ax = fig.add_subplot()
        _bare(ax)
        ax.text(0.5, 0.5, "no deconvolutions", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return [ax]
    grid = fig.add_gridspec(rows, len(layers))
    axes = []
    for column, layer in enumerate(layers):
        neurons, pictures = (as_array(v) for v in deconv[layer])
        for row, (neuron, picture) in enumerate(zip(neurons[:max_per_layer], pictures[:max_per_layer])):
            ax = fig.add_subplot(grid[row, column])
            ax.imshow(normalize_picture(picture), interpolation="nearest")
            _bare(ax)
            title = f"{layer_labels.get(layer, layer)} #{int(neuron)}" if row == 0 else f"#{int(neuron)}"
            ax.set_title(title, fontsize=7, pad=2)
            axes.append(ax)
    return axes


def deconvolution_figure(deconv: Mapping[str, tuple], layer_labels: Mapping[str, str] | None = None,
                         title: str | None = None, max_per_layer: int = 4) -> Figure:
    """Figure of deconvolution reconstructions; arguments as in ``draw_deconvolutions``."""
    rows = max([min(max_per_layer, len(as_array(v[0]))) for v in deconv.values()] or [1])
    fig = Figure(figsize=(1.5 * max(len(deconv), 1) + 0.3, 1.5 * rows + 0.5), layout="constrained")
    draw_deconvolutions(fig, deconv, layer_labels, max_per_layer)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def contact_sheet(heatmaps, titles: Sequence[str] | None = None, columns: int | None = None,
                  images=None, shared_limit: bool = False, title: str | None = None,
                  panel_inches: float = 1.6) -> Figure:
    """A grid of many heatmaps with titles (e.g. one summary heatmap per class).

    heatmaps: (N, 3, H, W), (N, H, W) or a sequence of such maps (sizes may differ). titles: N
    strings. columns: default about sqrt(N) * 1.5. images: optional N display images to overlay
    on. shared_limit: one colour limit for all panels (compare magnitudes) instead of one each
    (compare patterns).
    """
    maps = [relevance_map(h) for h in (heatmaps if isinstance(heatmaps, (list, tuple)) else as_array(heatmaps))]
    count = len(maps)
    columns = columns or max(1, min(count, int(np.ceil(np.sqrt(max(count, 1)) * 1.5))))
    rows = max(1, int(np.ceil(count / columns)))
    limit = symmetric_limit(np.concatenate([m.ravel() for m in maps])) if shared_limit and maps else None
    fig = Figure(figsize=(panel_inches * columns + 0.2, (panel_inches + 0.25) * rows + (0.4 if title else 0.1)),
                 layout="constrained")
    grid = GridSpec(rows, columns, figure=fig)
    for index in range(rows * columns):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        if index >= count:
            ax.set_axis_off()
            continue
        image = None if images is None else images[index]
        draw_heatmap(ax, maps[index], limit, image=image,
                     title=None if titles is None else str(titles[index]))
    if count == 0:
        fig.text(0.5, 0.5, "no heatmaps", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def explanation_figure(analysis, index: int = 0, image=None, layer_labels: Mapping[str, str] | None = None,
                       class_names: Sequence[str] | None = None, score_target: float | None = None,
                       title: str | None = None, max_per_layer: int = 8) -> Figure:
    """The paper-like figure of one image's analysis.

    analysis: an ``lrpscale.analyze.BatchAnalysis``; index: which of its images. image: (H, W, 3)
    display image in [0, 1] or uint8 (see ``display_image``). Panels: the image and its heatmap;
    for each swept layer a row of heatmaps restricted to its top-k neurons across the sweep (k*
    framed, colours on the full heatmap's scale); MSE/SMAPE against k; deconvolutions of the
    path neurons (one column per conv path layer); the critical-path graph. layer_labels: module
    name -> alias; class_names: index -> name; score_target: the SMAPE target line.
    """
    layer_labels = dict(layer_labels or {})
    heatmap = relevance_map(analysis.heatmap[index])
    limit = symmetric_limit(heatmap)
    sweeps = list(analysis.sweeps.items())
    deconv = {layer: (channels[index], pictures[index]) for layer, (channels, pictures) in analysis.deconv.items()}
    graph = analysis_graph(analysis, index)
    k_panels = max([len(s.ks) for _, s in sweeps] or [1])
    deconv_rows = max([min(4, len(v[0])) for v in deconv.values()] or [1])
    rows = max(len(sweeps), 1)
    width = max(16.0, 1.7 * (k_panels + 2.6))
    heights = [2.3 * rows + 0.3, max(3.2, 1.05 * deconv_rows + 0.6), 4.2]

    fig = Figure(figsize=(width, sum(heights) + 0.4), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=heights)
    source, restricted = top.subfigures(1, 2, width_ratios=[2.6, k_panels])
    ax_image, ax_heatmap = source.subplots(1, 2)
    if image is not None:
        ax_image.imshow(display_image(image))
    ax_image.set_title("input", fontsize=9)
    _bare(ax_image)
    draw_heatmap(ax_heatmap, heatmap, limit, title="LRP relevance", colorbar=True)
    for row, (layer, result) in zip(np.atleast_1d(restricted.subfigures(rows, 1)), sweeps):
        chosen_k = int(result.ks[int(result.chosen[index])])
        draw_restricted_heatmaps(row, result.heatmaps[index], result.ks, chosen_k, limit)
        row.suptitle(f"{layer_labels.get(layer, layer)}: relevance of the top-k neurons only, same colour scale",
                     fontsize=9)

    curves, pictures = middle.subfigures(1, 2, width_ratios=[2.0, 1.6])
    ax_mse, ax_smape = curves.subplots(1, 2)
    several = len(sweeps) > 1
    for position, (layer, result) in enumerate(sweeps):
        scores = {variant: (mse_values[index], smape_values[index])
                  for variant, (mse_values, smape_values) in result.scores.items()}
        draw_score_curves(ax_mse, ax_smape, result.ks, scores, int(result.ks[int(result.chosen[index])]),
                          score_target if position == 0 else None,
                          label=layer_labels.get(layer, layer) if several else None,
                          color=f"C{position}" if several else None)
    curves.suptitle("restricted heatmap vs full heatmap (fidelity) and activation vs relevance of the "
                    "kept neurons (forward-backward)", fontsize=9)
    draw_deconvolutions(pictures, deconv, layer_labels)
    pictures.suptitle("deconvolution: what the top path neurons see", fontsize=9)

    draw_path_graph(bottom.subplots(), graph, layer_labels=layer_labels, class_names=class_names,
                    max_per_layer=max_per_layer)
    bottom.suptitle("critical path, input side to class: node area = relevance (within its layer), "
                    "edge width = relevance passed down; red +, blue -", fontsize=9)
    fig.suptitle(title or explanation_title(analysis, index, class_names), fontsize=11, fontweight="bold")
    return fig


def analysis_graph(analysis, index: int = 0) -> nx.DiGraph:
    """The critical-path graph of one image of a BatchAnalysis (``lrpscale.paths.path_graph``)."""
    return path_graph(analysis.nodes[index], analysis.edges[index])


def explanation_title(analysis, index: int = 0, class_names: Sequence[str] | None = None) -> str:
    """One line on an analysed image: prediction and probability, the explained class if it differs,
    and the conservation error."""
    logits = as_array(analysis.logits[index]).astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    prediction, target = int(logits.argmax()), int(as_array(analysis.target)[index])
    text = f"predicted {class_label(prediction, class_names)}, p = {probabilities[prediction]:.3f}"
    if target != prediction:
        text += f"; explained {class_label(target, class_names)}, p = {probabilities[target]:.3f}"
    error = float(as_array(analysis.conservation_error)[index])
    return text + f"; conservation error {error:.1e}"


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for embedding in HTML as a data URI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write the figure as PNG to ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, facecolor="white")
    return path


