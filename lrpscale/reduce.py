"""The reducer: class-level summaries of a run, computed in one streaming pass per table.

Per class, both by true label and by prediction: the summary heatmap (mean of the per-image
heatmaps, each divided by its sum of |H|), how often each neuron is selected and its mean
relevance, how often each critical-path edge appears and its mean weight, the MSE/SMAPE curves
against k and the chosen-k counts. Tables are read a record batch at a time and folded into
per-class accumulators, so memory depends on the number of classes and neurons, not images.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

import torch

from .models import build_vgg, layer_aliases
from .paths import OUTPUT, path_graph
from .schema import tensor_column
from .viz import file_safe

BY = ("label", "pred")
CLASSES = "classes"


def committed_files(run: Path, table: str) -> list[str]:
    """The Parquet files of a run table whose shards are committed (a crashed shard's are not)."""
    folder = run / table
    committed = {p.stem for p in (run / "_commits").glob("part-*.json")}
    return sorted(str(p) for p in folder.glob("part-*.parquet") if p.stem in committed) if folder.is_dir() else []


def _batches(run: Path, table: str, columns: list[str], batch_size: int = 4096):
    """Record batches of a run table, committed shards only."""
    files = committed_files(run, table)
    if not files:
        return
    yield from ds.dataset(files, format="parquet").to_batches(columns=columns, batch_size=batch_size)


def _class_keys(batch: pa.RecordBatch) -> dict[str, list]:
    """Per row, its class under each grouping: the label string, and the prediction as a string."""
    labels = batch.column("label").to_pylist()
    preds = [str(p) for p in batch.column("pred").to_pylist()]
    return {"label": labels, "pred": preds}


@dataclass
class ClassSummary:
    """Accumulators of one class under one grouping."""

    images: int = 0
    correct: int = 0
    heatmap_sum: np.ndarray | None = None


def reduce_run(run: str | Path, top_nodes: int = 8, min_edge_frequency: float = 0.1, pictures: bool = True) -> Path:
    """Write ``RUN/classes/``: summary heatmaps, node/edge/k-curve tables, GraphML and PNGs.

    top_nodes: neurons per layer kept in a class graph (the most frequently selected);
    min_edge_frequency: edges between kept neurons that appear in at least this fraction of
    the class's images. Returns the classes directory.
    """
    run = Path(run)
    out = run / CLASSES
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[tuple[str, str], ClassSummary] = defaultdict(ClassSummary)
    pred_names: dict[str, str] = {}
    side = None
    for batch in _batches(run, "images", ["label", "label_index", "pred", "pred_label", "heatmap"]):
        keys = _class_keys(batch)
        heat_type = batch.schema.field("heatmap").type
        side = heat_type.shape
        maps = batch.column("heatmap").to_numpy_ndarray().astype(np.float32)
        sums = np.abs(maps).reshape(len(maps), -1).sum(1)
        normalized = maps / np.where(sums > 0, sums, 1).reshape(-1, 1, 1)
        correct = [li is not None and li == p for li, p in zip(batch.column("label_index").to_pylist(),
                                                            batch.column("pred").to_pylist())]
        for p, name in zip(batch.column("pred").to_pylist(), batch.column("pred_label").to_pylist()):
            pred_names[str(p)] = name
        for by in BY:
            for row, cls in enumerate(keys[by]):
                if cls is None:
                    continue
                summary = summaries[(by, cls)]
                summary.images += 1
                summary.correct += bool(correct[row])
                summary.heatmap_sum = normalized[row] if summary.heatmap_sum is None else (
                    summary.heatmap_sum + normalized[row])
    if not summaries:
        raise ValueError(f"{run} has no analysed images: nothing to reduce")

    node_stats = _fold(run, "neurons", ["label", "pred", "layer", "neuron", "relevance", "activation"],
                       ("layer", "neuron"), ("relevance", "activation"))
    edge_stats = _fold(run, "edges", ["label", "pred", "layer_from", "neuron_from", "layer_to", "neuron_to",
                                      "relevance"], ("layer_from", "neuron_from", "layer_to", "neuron_to"),
                       ("relevance",))
    curve_stats = _fold(run, "scores", ["label", "pred", "layer", "k", "variant", "mse", "smape", "chosen"],
                        ("layer", "k", "variant"), ("mse", "smape", "chosen"))

    def display(by: str, cls: str) -> str:
        return pred_names.get(cls, cls) if by == "pred" else cls

    heatmaps = pa.table({
        "by": [by for by, _ in summaries], "class": [cls for _, cls in summaries],
        "class_name": [display(by, cls) for by, cls in summaries],
        "images": [s.images for s in summaries.values()],
        "accuracy": [s.correct / s.images for s in summaries.values()],
        "heatmap": tensor_column([s.heatmap_sum / s.images for s in summaries.values()], side, pa.float32()),
    })
    pq.write_table(heatmaps, out / "summary_heatmaps.parquet")
    images_of = {key: s.images for key, s in summaries.items()}
    nodes = _frame(node_stats, ("layer", "neuron"), images_of)
    edges = _frame(edge_stats, ("layer_from", "neuron_from", "layer_to", "neuron_to"), images_of)
    curves = _frame(curve_stats, ("layer", "k", "variant"), images_of)
    curves = curves.rename(columns={"mean_chosen": "chosen_fraction"})
    nodes.to_parquet(out / "nodes.parquet", index=False)
    edges.to_parquet(out / "edges.parquet", index=False)
    curves.to_parquet(out / "k_curves.parquet", index=False)
    (out / "graphml").mkdir(exist_ok=True)
    graphs = {}
    for by, cls in summaries:
        graph = class_graph(nodes, edges, by, cls, top_nodes, min_edge_frequency)
        graphs[(by, cls)] = graph
        nx.write_graphml(_graphml_ready(graph), out / "graphml" / f"{by}-{file_safe(cls)}.graphml")
    (out / "summary.json").write_text(json.dumps({
        "classes": {by: sorted({c for b, c in summaries if b == by}) for by in BY},
        "images": int(sum(s.images for (b, _), s in summaries.items() if b == "pred")),
        "top_nodes": top_nodes, "min_edge_frequency": min_edge_frequency}, indent=2))
    if pictures:
        from . import viz

        viz.class_pictures(out, heatmaps, graphs, curves, _layer_labels(run))
    return out


def _layer_labels(run: Path) -> dict[str, str]:
    """features.28 -> conv5_3 for the run's architecture (read from run.json), for pictures."""
    info = json.loads((run / "run.json").read_text())
    with torch.device("meta"):  # only the layer structure is needed, not weights
        model = build_vgg(info["config"]["model"], init=False)
    return {name: alias for alias, name in layer_aliases(model).items()}


def _fold(run: Path, table: str, columns: list[str], keys: tuple[str, ...], values: tuple[str, ...]) -> pd.DataFrame:
    """Stream a flat table into per-(grouping, class, key) counts, sums and image counts."""
    partials = []
    for batch in _batches(run, table, columns):
        frame = batch.to_pandas()
        frame["pred"] = frame["pred"].astype(str)
        for by in BY:
            part = frame.dropna(subset=[by]).assign(by=by).rename(columns={by: "class"})
            agg = {f"sum_{v}": (v, "sum") for v in values}
            partials.append(part.groupby(["by", "class", *keys], observed=True).agg(count=(keys[0], "size"), **agg))
        # combine as we go: the partial frames stay bounded by the distinct keys, not by images
        if len(partials) > 16:
            partials = [pd.concat(partials).groupby(level=list(range(2 + len(keys)))).sum()]
    if not partials:
        return pd.DataFrame(columns=["by", "class", *keys, "count", *[f"sum_{v}" for v in values]])
    return pd.concat(partials).groupby(level=list(range(2 + len(keys)))).sum().reset_index()


def _frame(stats: pd.DataFrame, keys: tuple[str, ...], images_of: dict) -> pd.DataFrame:
    """Counts and sums -> frequency (per image of the class) and means."""
    frame = stats.copy()
    frame["class_images"] = [images_of.get((b, c), 0) for b, c in zip(frame["by"], frame["class"])]
    frame["frequency"] = frame["count"] / frame["class_images"].where(frame["class_images"] > 0, 1)
    for column in [c for c in frame.columns if c.startswith("sum_")]:
        frame[f"mean_{column[4:]}"] = frame[column] / frame["count"]
    return frame.drop(columns=[c for c in frame.columns if c.startswith("sum_")])


def class_graph(nodes: pd.DataFrame, edges: pd.DataFrame, by: str, cls: str, top_nodes: int = 8,
                min_edge_frequency: float = 0.1) -> nx.DiGraph:
    """The aggregated critical path of one class: per layer the ``top_nodes`` most frequently
    selected neurons, and the edges between them seen in at least ``min_edge_frequency`` of the
    class's images. Node attributes: frequency, mean relevance; edge: frequency, mean relevance."""
    mine = nodes[(nodes["by"] == by) & (nodes["class"] == cls)]
    kept = mine.sort_values(["layer", "frequency", "mean_relevance"], ascending=[True, False, False]).groupby(
        "layer").head(top_nodes)
    node_records = [{"layer": r.layer, "neuron": int(r.neuron), "frequency": float(r.frequency),
                     "relevance": float(r.mean_relevance), "activation": float(r.mean_activation)}
                    for r in kept.itertuples()]
    keep = {(r["layer"], r["neuron"]) for r in node_records}
    mine_edges = edges[(edges["by"] == by) & (edges["class"] == cls) & (edges["frequency"] >= min_edge_frequency)]
    edge_records = []
    for r in mine_edges.itertuples():
        upper = (r.layer_to, int(r.neuron_to))
        if (r.layer_from, int(r.neuron_from)) in keep and (upper in keep or r.layer_to == OUTPUT):
            edge_records.append({"layer_from": r.layer_from, "neuron_from": int(r.neuron_from),
                                 "layer_to": r.layer_to, "neuron_to": int(r.neuron_to),
                                 "relevance": float(r.mean_relevance)})
    graph = path_graph(node_records, edge_records)
    for r in mine_edges.itertuples():
        key = ((r.layer_from, int(r.neuron_from)), (r.layer_to, int(r.neuron_to)))
        if graph.has_edge(*key):
            graph.edges[key]["frequency"] = float(r.frequency)
    for node in graph.nodes:
        graph.nodes[node].setdefault("layer", node[0])
    return graph


def _graphml_ready(graph: nx.DiGraph) -> nx.DiGraph:
    """GraphML wants scalar node ids: (layer, neuron) -> "layer:neuron"."""
    return nx.relabel_nodes(graph, {node: f"{node[0]}:{node[1]}" for node in graph.nodes})
