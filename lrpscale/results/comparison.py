"""How the explanations moved between two runs: per class and per image.

Per class (grouped by true label): the change of accuracy, the drift of the summary heatmap
(cosine similarity and MSE of the reducer's class means), the overlap (Jaccard) of the class
critical path's neurons and edges, and the change of the chosen k and of the fidelity SMAPE at
the chosen k. Per image present in both runs: whether the prediction changed, and the cosine
similarity and MSE of the two stored heatmaps. Images are streamed a record batch at a time and
matched by image_id, so memory holds one batch of heatmaps, not a run's.

    comparison = compare_runs("runs/a1b2c3", "runs/d4e5f6")
    comparison.classes.sort_values("heatmap_cosine").head()
    comparison.write("runs/d4e5f6/compare-a1b2c3")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lrpscale.graph import OUTPUT
from lrpscale.results.class_counts import class_order
from lrpscale.results.reducer import reduce_run
from lrpscale.results.run import Run
from lrpscale.storage.store import RunStore
from lrpscale.storage.tables import square_picture

BATCH = 2048  # images per streamed batch: two batches of 56x56 float32 heatmaps are ~50 MB


@dataclass
class Comparison:
    """The comparison of run ``a`` (before) with run ``b`` (after).

    summary: dict of headline numbers; classes: one row per class (by label); images: one row
    per image analysed in both runs, prediction changes first, then the largest heatmap drift.
    """

    summary: dict
    classes: pd.DataFrame
    images: pd.DataFrame

    def text(self, rows: int = 10) -> str:
        """A readable summary: headline numbers, the classes that drifted most, the images that changed most."""
        s = self.summary
        lines = [f"warning: {warning}" for warning in s.get("warnings", [])]
        lines += [f"run {s['run_a']} ({s['model_a']}, {s['architecture_a']}, {s['completeness_a']}) -> "
                  f"run {s['run_b']} ({s['model_b']}, {s['architecture_b']}, {s['completeness_b']})",
                 f"classes: {s['classes_common']} in both, {s['classes_only_a']} only in A, {s['classes_only_b']} only in B",
                 f"images: {s['images_a']} -> {s['images_b']}, {s['images_common']} in both",
                 f"accuracy: {percent(s['accuracy_a'])} -> {percent(s['accuracy_b'])}",
                 f"predictions changed: {s['prediction_changed']} of {s['images_common']}",
                 f"mean heatmap cosine similarity per image: {s['mean_heatmap_cosine']:.3f}",
                 f"mean class critical-path overlap (Jaccard): neurons {s['mean_node_jaccard']:.3f}, "
                 f"edges {s['mean_edge_jaccard']:.3f}", ""]
        if len(self.classes):
            lines.append("classes whose explanation drifted most (lowest summary-heatmap cosine):")
            columns = ["class", "present", "accuracy_change", "heatmap_cosine", "node_jaccard", "edge_jaccard", "k_change",
                       "smape_change"]
            lines.append(self.classes.nsmallest(rows, "heatmap_cosine")[columns].to_string(
                index=False, float_format=lambda v: f"{v:.3f}"))
            lines.append("")
        if len(self.images):
            lines.append("images that changed most:")
            columns = ["image_id", "label", "pred_a", "pred_b", "heatmap_cosine", "smape_a", "smape_b"]
            lines.append(self.images.head(rows)[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> Path | str:
        """``classes.parquet``, ``images.parquet``, ``summary.json`` and ``summary.md`` in
        ``directory`` (a path or URI; each file written whole or not at all). Returns it."""
        out = RunStore(directory)  # any folder: the store's atomic writes, not a run
        out.write_parquet("classes.parquet", pa.Table.from_pandas(self.classes, preserve_index=False))
        out.write_parquet("images.parquet", pa.Table.from_pandas(self.images, preserve_index=False))
        out.write_bytes("summary.json", json.dumps(self.summary, indent=2, default=_json_number).encode())
        out.write_bytes("summary.md", self.text().encode())
        return out.local_path() or out.location


def compare_runs(a: str | Path | Run, b: str | Path | Run, top_nodes: int = 8,
                 min_edge_frequency: float = 0.1) -> Comparison:
    """Compare run ``a`` (before) with run ``b`` (after); reduces a run that has no ``classes/``.

    top_nodes / min_edge_frequency: how each class's critical-path graph is cut, as in the reducer.
    """
    run_a, run_b = (r if isinstance(r, Run) else Run(r) for r in (a, b))
    for run in (run_a, run_b):
        if not run.is_reduced:
            reduce_run(run.store)
    labels_a, labels_b = (set(_class_table(run)) for run in (run_a, run_b))
    if not labels_a & labels_b:
        raise ValueError(f"the runs share no class: A has {_listed(labels_a)}, B has {_listed(labels_b)}; "
                         "a comparison needs the same classes (the same labels) in both")
    warnings = [f"{name} {note}" for name, run in (("A:", run_a), ("B:", run_b)) if (note := run.incomplete_note())]
    same_architecture = run_a.architecture == run_b.architecture
    if not same_architecture:
        warnings.append(f"the runs use different architectures ({run_a.architecture} vs {run_b.architecture}): "
                        "their neurons are not the same neurons, so no critical-path overlap is computed")
    if labels_a != labels_b:
        warnings.append(f"{len(labels_a - labels_b)} classes only in A, {len(labels_b - labels_a)} only in B: "
                        "they are marked as such and left out of the means")
    images = _compare_images(run_a, run_b)
    classes = _compare_classes(run_a, run_b, top_nodes, min_edge_frequency, same_architecture)
    both = classes[classes["present"] == "both"]
    accuracy = {key: _accuracy(run) for key, run in (("a", run_a), ("b", run_b))}
    summary = {
        "run_a": run_a.info.get("run_id"), "run_b": run_b.info.get("run_id"),
        "path_a": str(run_a.path), "path_b": str(run_b.path),
        "model_a": run_a.info.get("model_id"), "model_b": run_b.info.get("model_id"),
        "composite_a": run_a.info.get("composite"), "composite_b": run_b.info.get("composite"),
        "images_a": accuracy["a"][1], "images_b": accuracy["b"][1], "images_common": len(images),
        "accuracy_a": accuracy["a"][0], "accuracy_b": accuracy["b"][0],
        "prediction_changed": int(images["prediction_changed"].sum()),
        "mean_heatmap_cosine": _mean(images["heatmap_cosine"]),
        "mean_node_jaccard": _mean(both["node_jaccard"]), "mean_edge_jaccard": _mean(both["edge_jaccard"]),
        "classes": len(classes), "classes_common": len(both), "classes_only_a": len(labels_a - labels_b),
        "classes_only_b": len(labels_b - labels_a),
        "architecture_a": run_a.architecture, "architecture_b": run_b.architecture,
        "complete_a": run_a.is_complete, "complete_b": run_b.is_complete,
        "completeness_a": _completeness(run_a), "completeness_b": _completeness(run_b),
        "warnings": warnings,
    }
    return Comparison(summary, classes, images)


def _accuracy(run: Run) -> tuple[float | None, int]:
    """(accuracy over images with a known label, analysed images)."""
    table = run.arrow("images", ["label_index", "pred"])
    known = table.filter(table.column("label_index").is_valid())
    correct = pc.sum(pc.equal(known.column("label_index"), known.column("pred"))).as_py() or 0
    return (correct / known.num_rows if known.num_rows else None), table.num_rows


def _chosen_scores(run: Run) -> pd.DataFrame:
    """Per image: the chosen k and the fidelity SMAPE at it (mean over swept layers)."""
    where = (ds.field("chosen") == True) & (ds.field("variant") == "fidelity")  # noqa: E712 (an Arrow expression)
    frame = run.table("scores", ["image_id", "label", "k", "smape"], where)
    return frame.groupby("image_id", as_index=False).agg(label=("label", "first"), k=("k", "mean"),
                                                         smape=("smape", "mean"))


def _compare_images(run_a: Run, run_b: Run) -> pd.DataFrame:
    """One row per image in both runs: predictions, heatmap cosine and MSE, SMAPE at the chosen k."""
    files_b = run_b.files("images")
    columns = ["image_id", "label", "pred", "heatmap", "heatmap_scale"]
    parts = []
    if files_b and run_a.files("images"):
        dataset_b = ds.dataset(files_b, format="parquet", filesystem=run_b.store.fs)
        dataset_a = ds.dataset(run_a.files("images"), format="parquet", filesystem=run_a.store.fs)
        for batch in dataset_a.to_batches(columns=columns, batch_size=BATCH):
            ids = batch.column("image_id")
            # row-group statistics on image_id prune the files of b when both runs list in the same order
            other = dataset_b.to_table(columns=columns, filter=ds.field("image_id").isin(ids))
            if other.num_rows:
                parts.append(_image_rows(pa.Table.from_batches([batch]), other))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["image_id", "label", "pred_a", "pred_b", "heatmap_cosine", "heatmap_mse"])
    frame["prediction_changed"] = frame["pred_a"] != frame["pred_b"]
    scores_a, scores_b = _chosen_scores(run_a), _chosen_scores(run_b)
    frame = frame.merge(scores_a[["image_id", "smape"]].rename(columns={"smape": "smape_a"}), on="image_id", how="left")
    frame = frame.merge(scores_b[["image_id", "smape"]].rename(columns={"smape": "smape_b"}), on="image_id", how="left")
    frame["change"] = 1.0 - frame["heatmap_cosine"]
    frame = frame.sort_values(["prediction_changed", "change"], ascending=[False, False], ignore_index=True)
    return frame[["image_id", "label", "pred_a", "pred_b", "prediction_changed", "heatmap_cosine", "heatmap_mse",
                  "smape_a", "smape_b", "change"]]


def _image_rows(a: pa.Table, b: pa.Table) -> pd.DataFrame:
    """Match two tables of images by image_id and compare their heatmaps (each divided by sum |H|)."""
    order_b = {image_id: i for i, image_id in enumerate(b.column("image_id").to_pylist())}
    ids_a = a.column("image_id").to_pylist()
    rows_a = [i for i, image_id in enumerate(ids_a) if image_id in order_b]
    rows_b = [order_b[ids_a[i]] for i in rows_a]
    maps_a = _unit_heatmaps(a.take(rows_a))
    maps_b = _unit_heatmaps(b.take(rows_b))
    if maps_a.shape[1:] != maps_b.shape[1:]:
        raise ValueError(f"the runs store heatmaps of different sizes ({maps_a.shape[1:]} vs {maps_b.shape[1:]}); "
                         "compare runs with the same --heatmap-size")
    flat_a, flat_b = maps_a.reshape(len(rows_a), -1), maps_b.reshape(len(rows_b), -1)
    return pd.DataFrame({
        "image_id": [ids_a[i] for i in rows_a],
        "label": a.column("label").take(rows_a).to_pylist(),
        "pred_a": a.column("pred").take(rows_a).to_numpy(),
        "pred_b": b.column("pred").take(rows_b).to_numpy(),
        "heatmap_cosine": _cosine(flat_a, flat_b),
        "heatmap_mse": ((flat_a - flat_b) ** 2).mean(1),
    })


def _unit_heatmaps(table: pa.Table) -> np.ndarray:
    """(N, s, s) float32 heatmaps of an images table, each divided by its sum of |H| (0 stays 0)."""
    maps = table.column("heatmap").combine_chunks().to_numpy_ndarray().astype(np.float32)
    sums = np.abs(maps).reshape(len(maps), -1).sum(1)
    return maps / np.where(sums > 0, sums, 1).reshape(-1, 1, 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays; 1 where both rows are zero, 0 where one is."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0)
    cosine = (a * b).sum(1) / np.where(norms > 0, norms, 1)
    return np.where(both_zero, 1.0, cosine)


def _compare_classes(run_a: Run, run_b: Run, top_nodes: int, min_edge_frequency: float,
                     same_architecture: bool = True) -> pd.DataFrame:
    """One row per class (by label) present in either run; ``present`` says where ("both",
    "A only", "B only"). Overlaps are computed only for classes in both runs of one architecture
    (elsewhere NaN, not 0: a class that is missing did not change)."""
    heat_a, heat_b = (_class_table(run) for run in (run_a, run_b))
    scores = {key: _chosen_scores(run).groupby("label").agg(k=("k", "mean"), smape=("smape", "mean"))
              for key, run in (("a", run_a), ("b", run_b))}
    rows = []
    for cls in sorted(set(heat_a) | set(heat_b), key=class_order):
        row = {"class": cls, "present": "both" if cls in heat_a and cls in heat_b else ("A only" if cls in heat_a else "B only")}
        for key, heat in (("a", heat_a), ("b", heat_b)):
            images, accuracy, _ = heat.get(cls, (0, np.nan, None))
            row[f"images_{key}"], row[f"accuracy_{key}"] = images, accuracy
            in_scores = cls in scores[key].index
            row[f"k_{key}"] = scores[key].loc[cls, "k"] if in_scores else np.nan
            row[f"smape_{key}"] = scores[key].loc[cls, "smape"] if in_scores else np.nan
        map_a, map_b = heat_a.get(cls, (0, 0, None))[2], heat_b.get(cls, (0, 0, None))[2]
        if map_a is not None and map_b is not None and map_a.shape == map_b.shape:
            row["heatmap_cosine"] = float(_cosine(map_a.reshape(1, -1), map_b.reshape(1, -1))[0])
            row["heatmap_mse"] = float(((map_a - map_b) ** 2).mean())
        else:
            row["heatmap_cosine"] = row["heatmap_mse"] = np.nan
        if row["present"] == "both" and same_architecture:
            graph_a = run_a.class_graph(cls, "label", top_nodes, min_edge_frequency)
            graph_b = run_b.class_graph(cls, "label", top_nodes, min_edge_frequency)
            nodes = [{n for n in g.nodes if n[0] != OUTPUT} for g in (graph_a, graph_b)]
            row["node_jaccard"] = _jaccard(*nodes)
            row["edge_jaccard"] = _jaccard(set(graph_a.edges), set(graph_b.edges))
        else:
            row["node_jaccard"] = row["edge_jaccard"] = np.nan
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["class", "present", "images_a", "images_b", "accuracy_a", "accuracy_b", "heatmap_cosine",
                                        "heatmap_mse", "node_jaccard", "edge_jaccard", "k_a", "k_b", "smape_a",
                                        "smape_b"])
    for measure in ("accuracy", "k", "smape"):
        frame[f"{measure}_change"] = frame[f"{measure}_b"] - frame[f"{measure}_a"]
    return frame


def _class_table(run: Run) -> dict[str, tuple[int, float, np.ndarray]]:
    """class -> (images, accuracy, summary heatmap (s, s)) from the reducer's table, by label."""
    table = run.class_heatmaps[run.class_heatmaps["by"] == "label"]
    out = {}
    for cls, images, accuracy, heatmap in zip(table["class"], table["images"], table["accuracy"], table["heatmap"]):
        out[cls] = (int(images), float(accuracy), square_picture(heatmap))
    return out


def _jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; 1 for two empty sets (nothing changed)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def _completeness(run: Run) -> str:
    return "complete" if run.is_complete else f"incomplete, {run.committed_shards} of {run.info.get('shards', '?')} shards"


def _listed(labels: set) -> str:
    names = sorted(labels, key=class_order)
    return ", ".join(map(repr, names[:8])) + (f", ... ({len(names)} classes)" if len(names) > 8 else "") if names else "none"


def _mean(values: pd.Series) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else float("nan")


def percent(value) -> str:
    """A fraction as a percentage for people, "n/a" where it is unknown (None or NaN)."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def _json_number(value):
    """numpy scalars in the summary -> plain Python numbers for json."""
    return value.item() if hasattr(value, "item") else str(value)
