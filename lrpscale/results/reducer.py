"""The reducer: class-level summaries of a run, computed in one streaming pass per table.

Per class, both by true label and by prediction: the summary heatmap (mean of the per-image
heatmaps, each divided by its sum of |H|), how often each neuron is selected and its mean
relevance, how often each critical-path edge appears and its mean weight, the MSE/SMAPE curves
against k and the chosen-k counts, and the AOPC of the images the audit perturbed
(``lrpscale.results.faithfulness``). Tables are read one file at a time, in chunks of about a
million rows (string columns dictionary-encoded). Neurons and edges fold into dense per-class
arrays (``class_counts``), the k curves into Arrow hash aggregates merged as they come, so
memory depends on the number of classes and neurons, not images. Edges are counted among each
class's most frequent neurons only (``edge_nodes``), and to its most frequent targets: every
distinct edge of a class would grow with its images. 1.28M synthetic ImageNet images:
benchmarks/imagenet_scale.py.
"""
from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lrpscale.graph import OUTPUT, path_graph
from lrpscale.results.class_counts import BY, ClassIndex, EdgeCounts, NeuronCounts, TargetCounts, class_order
from lrpscale.results.faithfulness import AOPC_COLUMNS, class_faithfulness
from lrpscale.storage import tables
from lrpscale.storage.store import CLASSES, RunStore, safe_name
from lrpscale.storage.tables import tensor_column

CHOSEN_SCORES = "chosen_scores.parquet"
FAITHFULNESS_CURVES = "faithfulness_curves.parquet"


def _batches(run: RunStore, table: str, columns: list[str], batch_size: int = 4096, dictionaries: tuple[str, ...] = ()):
    """Record batches of a run table, committed shards only; ``dictionaries``: string columns to
    read dictionary-encoded (grouping and joining on them is then several times faster)."""
    # one file at a time, closed before the next: a dataset over a run's thousands of files keeps
    # every file's metadata and read-ahead buffers alive, and its memory grows with the run
    for path in run.committed_files(table):
        with run.parquet_file(path, read_dictionary=list(dictionaries)) as parquet:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def _chunks(run: RunStore, table: str, columns: list[str], rows: int):
    """A run table as Arrow tables of about ``rows`` rows, string columns dictionary-encoded with
    one dictionary per chunk: few large chunks keep the per-chunk cost of grouping and joining
    small, and memory stays bounded by ``rows``, not by the run."""
    strings = tuple(c for c in columns if c in _STRING_COLUMNS)
    pending, count = [], 0
    for batch in _batches(run, table, columns, min(rows, 1 << 16), strings):
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending).unify_dictionaries()
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending).unify_dictionaries()


_STRING_COLUMNS = {"label", "layer", "layer_from", "layer_to", "variant"}


@dataclass
class ClassSummary:
    """Accumulators of one class under one grouping."""

    images: int = 0
    correct: int = 0
    heatmap_sum: np.ndarray | None = None


def reduce_run(run: str | Path | RunStore, top_nodes: int = 8, min_edge_frequency: float = 0.1,
               edge_nodes: int = 16, picture_classes: int | None = 64) -> Path | str:
    """Write ``RUN/classes/``: summary heatmaps, node/edge/k-curve tables, chosen scores,
    GraphML and ``summary.json`` (the pictures are drawn from these by
    ``lrpscale.report.class_pictures``).

    top_nodes: neurons per layer kept in a class graph (the most frequently selected);
    min_edge_frequency: edges between kept neurons that appear in at least this fraction of
    the class's images. edge_nodes: ``edges.parquet`` keeps the edges among each class's
    ``edge_nodes`` most frequent neurons per layer (and from them to its ``edge_nodes`` most
    frequent targets at the output), so class graphs
    of up to that many neurons per layer are exact; counting every distinct edge would grow with
    the number of images. picture_classes: ``summary.json`` names at most this many classes per
    grouping to be pictured (the first in class order; None for all): a picture costs far more
    than a class's tables. Memory depends on the number of classes and neurons, not images.
    Returns the classes folder (a Path for a local run, else its URI).
    """
    run = run if isinstance(run, RunStore) else RunStore(run)
    index = ClassIndex()
    targets = TargetCounts(index)
    summaries, pred_names, side = _summarize_images(run, targets)
    if not summaries:
        raise ValueError(f"{run.location} has no analysed images: nothing to reduce")
    images_of = pd.DataFrame([(by, cls, s.images) for (by, cls), s in summaries.items()],
                             columns=["by", "class", "class_images"])

    neurons = NeuronCounts(index)
    for chunk in _chunks(run, "neurons", ["label", "pred", "layer", "neuron", "relevance", "activation"], 1 << 20):
        neurons.add(chunk)
    _write_nodes(run, f"{CLASSES}/nodes.parquet", neurons, images_of)
    # every table below needs at most each class's strongest neurons: a frame of bounded size.
    # Ranked once; the first edge_nodes of each ranking are the edge ends.
    ranked = neurons.top(max(edge_nodes, top_nodes))
    nodes = neurons.strongest(ranked, images_of)
    edge_keys = ("layer_from", "neuron_from", "layer_to", "neuron_to")
    edge_counts = EdgeCounts(index, {key: ids[:, :edge_nodes] for key, ids in ranked.items()},
                             {by: targets.top(by, edge_nodes) for by in BY},
                             {key: neurons.width(*key) for key in neurons.arrays})
    for chunk in _chunks(run, "edges", ["label", "pred", *edge_keys, "relevance"], 1 << 20):
        edge_counts.add(chunk)
    edge_stats = edge_counts.stats().sort_values(["by", "class", *edge_keys], ignore_index=True)
    _write_chosen_scores(run, f"{CLASSES}/{CHOSEN_SCORES}")
    curve_stats = _fold(run, "scores", ["label", "pred", "layer", "k", "variant", "mse", "smape", "chosen"],
                        ("layer", "k", "variant"), ("mse", "smape", "chosen"))

    class_aopc, faithfulness_curves = class_faithfulness(run)

    def display(by: str, cls: str) -> str:
        return pred_names.get(cls, cls) if by == "pred" else cls

    # per-class AOPC of the sampled images (docs/method.md §16); null for a class none of whose images was sampled
    aopc = class_aopc.set_index(["by", "class"]).reindex(list(summaries))
    heatmaps = pa.table({
        "by": [by for by, _ in summaries], "class": [cls for _, cls in summaries],
        "class_name": [display(by, cls) for by, cls in summaries],
        "images": [s.images for s in summaries.values()],
        "accuracy": [s.correct / s.images for s in summaries.values()],
        "heatmap": tensor_column([(s.heatmap_sum / s.images).astype(np.float32) for s in summaries.values()],
                                 side, pa.float32()),
        "faithfulness_images": pa.array(aopc["images"].fillna(0).to_numpy(np.int64)),
        **{name: pa.array(aopc[name].to_numpy(np.float64), pa.float64(), from_pandas=True)
           for name in AOPC_COLUMNS},
    })
    run.write_parquet(f"{CLASSES}/summary_heatmaps.parquet", heatmaps)
    run.write_parquet(f"{CLASSES}/{FAITHFULNESS_CURVES}",
                      pa.Table.from_pandas(faithfulness_curves, preserve_index=False))
    edges = _frame(edge_stats, edge_keys, images_of)
    curves = _frame(curve_stats, ("layer", "k", "variant"), images_of)
    curves = curves.rename(columns={"mean_chosen": "chosen_fraction"})
    run.write_parquet(f"{CLASSES}/edges.parquet", pa.Table.from_pandas(edges, preserve_index=False))
    run.write_parquet(f"{CLASSES}/k_curves.parquet", pa.Table.from_pandas(curves, preserve_index=False))
    # one split of the tables instead of a scan of all of them per class
    empty_nodes, empty_edges = nodes.iloc[:0], edges.iloc[:0]
    nodes_of = dict(iter(nodes.groupby(["by", "class"], sort=False)))
    edges_of = dict(iter(edges.groupby(["by", "class"], sort=False)))
    for by, cls in summaries:
        graph = class_graph(nodes_of.get((by, cls), empty_nodes), edges_of.get((by, cls), empty_edges), by, cls,
                            top_nodes, min_edge_frequency)
        graphml = io.BytesIO()
        nx.write_graphml(_graphml_ready(graph), graphml)
        run.write_bytes(f"{CLASSES}/graphml/{by}-{safe_name(cls)}.graphml", graphml.getvalue())
    shown = {by: sorted((c for b, c in summaries if b == by), key=class_order)[:picture_classes] for by in BY}
    run.write_bytes(f"{CLASSES}/summary.json", json.dumps({
        "classes": {by: sorted({c for b, c in summaries if b == by}) for by in BY},
        "images": int(sum(s.images for (b, _), s in summaries.items() if b == "pred")),
        "top_nodes": top_nodes, "min_edge_frequency": min_edge_frequency, "edge_nodes": edge_nodes,
        "picture_classes": shown}, indent=2).encode())
    local = run.local_path()
    return local / CLASSES if local else run.classes_path()


def _summarize_images(run: RunStore, targets: TargetCounts) -> tuple[dict[tuple[str, str], ClassSummary], dict[str, str],
                                                                   list[int] | None]:
    """Per (grouping, class): image count, correct count and the sum of normalised heatmaps; the
    display name of each prediction; the heatmap shape.
    ``targets`` counts the explained outputs of each class."""
    summaries: dict[tuple[str, str], ClassSummary] = defaultdict(ClassSummary)
    pred_names: dict[str, str] = {}
    side = None
    for chunk in _chunks(run, "images", ["label", "label_index", "pred", "pred_label", "target", "heatmap"], 4096):
        side = chunk.schema.field("heatmap").type.shape
        targets.add(chunk)
        maps = chunk.column("heatmap").combine_chunks().to_numpy_ndarray().reshape(chunk.num_rows, -1)
        maps = maps.astype(np.float32)
        maps /= np.maximum(np.abs(maps).sum(1, keepdims=True), 1e-30)
        correct = pc.fill_null(pc.equal(chunk.column("label_index"), chunk.column("pred")), False)
        correct = correct.to_numpy(zero_copy_only=False).astype(np.int64)
        names = pa.table({"pred": chunk.column("pred"), "name": chunk.column("pred_label")}).group_by(
            ["pred", "name"]).aggregate([])
        pred_names.update(zip(map(str, names.column("pred").to_pylist()), names.column("name").to_pylist()))
        for by in BY:
            valid = chunk.column(by).is_valid().to_numpy(zero_copy_only=False)
            classes = chunk.column(by).filter(pa.array(valid)).combine_chunks().dictionary_encode()
            codes = classes.indices.to_numpy().astype(np.int64)
            count = len(classes.dictionary)
            # per chunk in float32 (at most 4096 terms), across chunks in float64
            heat = _sum_by_code(maps[valid], codes, count).astype(np.float64)
            images = np.bincount(codes, minlength=count).tolist()
            hits = np.bincount(codes, weights=correct[valid], minlength=count).astype(np.int64).tolist()
            for cls, total, seen, good in zip(classes.dictionary.to_pylist(), heat, images, hits):
                if not seen:  # a dictionary may name values that the rows kept here do not hold
                    continue
                summary = summaries[(by, str(cls))]
                summary.images += seen
                summary.correct += good
                summary.heatmap_sum = total.copy() if summary.heatmap_sum is None else summary.heatmap_sum + total
    return summaries, pred_names, side


def _sum_by_code(rows: np.ndarray, codes: np.ndarray, count: int) -> np.ndarray:
    """(count, P) sums of the (N, P) ``rows`` grouped by ``codes`` (N,): one pass over the rows
    sorted by code, with np.add.reduceat."""
    out = np.zeros((count, rows.shape[1]), rows.dtype)
    if len(codes):
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        out[sorted_codes[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def _write_nodes(run: RunStore, relative: str, neurons: NeuronCounts, images_of: pd.DataFrame) -> None:
    """``nodes.parquet``: one row per (grouping, class, layer, neuron) selected at least once,
    written one (grouping, layer) at a time."""
    writer = None
    with run.open_atomic(relative) as stream:
        try:
            for by, layer, (rows, ids) in neurons.selected():
                table = pa.Table.from_pandas(neurons.frame(by, layer, rows, ids, images_of), preserve_index=False)
                writer = writer or pq.ParquetWriter(stream, table.schema)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer:
                writer.close()


def _write_chosen_scores(run: RunStore, relative: str, rows_per_group: int = 1 << 17) -> None:
    """``chosen_scores.parquet``: the scores rows at each image's chosen k (one per image, layer
    and variant), in shard order. The whole run's explanation quality in one small file, where
    the scores table spreads it over every shard: the 100 worst-explained of 1.28M images is one
    read instead of 5,005 files opened."""
    columns = ["image_id", "label", "pred", "layer", "variant", "k", "mse", "smape"]
    target = pa.schema([tables.SCORES.field(name) for name in columns])
    pending, count = [], 0
    with run.open_atomic(relative) as stream, pq.ParquetWriter(stream, target) as writer:
        for batch in _batches(run, "scores", [*columns, "chosen"]):
            chosen = pa.Table.from_batches([batch]).filter(pc.fill_null(batch.column("chosen"), False))
            pending.append(chosen.select(columns).cast(target))
            count += chosen.num_rows
            if count >= rows_per_group:
                writer.write_table(pa.concat_tables(pending), row_group_size=count)
                pending, count = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=max(count, 1))


def _fold(run: RunStore, table: str, columns: list[str], keys: tuple[str, ...], values: tuple[str, ...],
          rows: int = 1 << 20) -> pd.DataFrame:
    """Stream a flat table into per-(grouping, class, key) counts and sums, for keys with few
    distinct values (the k curves: layer, k, variant).

    Arrow's hash aggregation on chunks of ``rows`` rows; partial results are merged as they come,
    so they stay bounded by the distinct keys.
    """
    group_keys = ["by", "class", *keys]
    partials: list[pa.Table] = []
    for chunk in _chunks(run, table, columns, rows):
        if "chosen" in values:
            chunk = chunk.set_column(chunk.schema.get_field_index("chosen"), "chosen",
                                     chunk.column("chosen").cast(pa.int64()))
        for by in BY:
            part = chunk.filter(pc.is_valid(chunk.column(by)))
            part = part.group_by([by, *keys]).aggregate([([], "count_all"), *[(v, "sum") for v in values]])
            names = {by: "class", "count_all": "count", **{f"{v}_sum": f"sum_{v}" for v in values}}
            part = part.rename_columns([names.get(n, n) for n in part.column_names])
            part = pa.table({name: part.column(name).cast(pa.string()) if name == "class" or pa.types.is_dictionary(
                part.schema.field(name).type) else part.column(name) for name in part.column_names})
            part = part.append_column("by", pa.array([by] * part.num_rows, pa.string()))
            partials.append(part.select([*group_keys, "count", *[f"sum_{v}" for v in values]]))
        if len(partials) > 16:
            partials = [_merge(partials, group_keys, values)]
    if not partials:
        return pd.DataFrame(columns=[*group_keys, "count", *[f"sum_{v}" for v in values]])
    return _merge(partials, group_keys, values).to_pandas().sort_values(group_keys, ignore_index=True)


def _merge(partials: list[pa.Table], group_keys: list[str], values: tuple[str, ...]) -> pa.Table:
    """Partial aggregates (count, sum_v per key) -> one table of the same columns."""
    totals = ["count", *[f"sum_{v}" for v in values]]
    merged = pa.concat_tables(partials).group_by(group_keys).aggregate([(c, "sum") for c in totals])
    merged = merged.rename_columns([n[:-4] if n[:-4] in totals else n for n in merged.column_names])
    return merged.select([*group_keys, *totals])


def _frame(stats: pd.DataFrame, keys: tuple[str, ...], images_of: pd.DataFrame) -> pd.DataFrame:
    """Counts and sums -> frequency (per image of the class) and means."""
    frame = stats.merge(images_of, on=["by", "class"], how="left")
    frame["class_images"] = frame["class_images"].fillna(0).astype(np.int64)
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
    kept = mine.sort_values(["layer", "frequency", "mean_relevance", "neuron"],
                            ascending=[True, False, False, True]).groupby("layer").head(top_nodes)
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
