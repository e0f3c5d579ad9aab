"""SpRAy over a whole run (docs/method.md §18, "In a run"): the prediction strategies of every
class, by label and by prediction, from the committed images and neurons tables, written as three
tables under ``classes/``.

    index = class_index(store)                                    # the classes and their shards
    plan = plan_partitions(store, index)                          # rows regrouped by class ...
    files = bucket_files([write_partition(store, plan, p) for p in range(len(plan.parts))])
    parts = [analyse_strategy_class(store, files[plan.buckets[g, c]], g, c, settings) for g, c in ...]
    write_strategies(store, strategy_tables(parts), settings)

A class needs only its own rows, so ``lrpscale.run.strategies`` runs the regrouping (one pass over
the shards, ``class_partitions``) as one Ray task per part and then one task per class;
``compute_strategies`` does the same here, one step after another (no Ray).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lrpscale import __version__
from lrpscale.results.class_counts import BY, class_order
from lrpscale.results.class_partitions import bucket_files, plan_partitions, read_class, remove_partitions, write_partition
from lrpscale.results.run import STRATEGY_FILES, STRATEGY_SETTINGS
from lrpscale.results.spray import analyse_class, channel_features, heatmap_features
from lrpscale.storage.store import CLASSES, RunStore
from lrpscale.storage.tables import tensor_column

FEATURES = ("heatmap", "channels")

DISTINGUISHING = pa.struct([("layer", pa.string()), ("neuron", pa.int32()), ("frequency_inside", pa.float64()),
                            ("frequency_outside", pa.float64())])
IMAGE_ROWS = pa.schema([("grouping", pa.string()), ("class", pa.string()), ("image_id", pa.string()),
                        ("cluster", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("sampled", pa.bool_())])


@dataclass(frozen=True)
class StrategySettings:
    """How the strategies are computed; recorded beside the tables (``strategies.json`` and the
    columns of ``strategy_classes``). features: "heatmap" (the stored heatmap, sum-pooled to at
    most 32x32) or "channels" (the first swept layer's relevance per channel); k, n_eigval,
    max_clusters, seed and cap as in ``analyse_class``; top_neurons: distinguishing neurons kept
    per cluster."""

    features: str = "heatmap"
    k: int = 10
    n_eigval: int = 32
    max_clusters: int = 10
    seed: int = 0
    cap: int = 20000
    top_neurons: int = 5

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        for name in ("k", "n_eigval", "max_clusters", "cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.top_neurons < 0:
            raise ValueError(f"top_neurons must be at least 0, got {self.top_neurons}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassStrategyTables:
    """What one class gives: its images' rows (``IMAGE_ROWS``), its row of ``strategy_classes``
    (a dict, rank still missing) and its clusters' rows."""

    images: pa.Table
    summary: dict
    clusters: pa.Table


def class_index(run: RunStore) -> pd.DataFrame:
    """The classes of a run's analysed images: one row per (grouping, class) with ``class_name``
    (the prediction's name for ``pred``), ``images`` and ``shards``, the base names of the
    committed images files that hold the class. One pass over three small columns of each file.
    Raises ValueError when the run has no analysed image."""
    counts: dict[tuple[str, str], list] = {}
    names: dict[str, str] = {}
    for path in run.committed_files("images"):
        shard = path.rpartition("/")[2]
        with run.parquet_file(path) as parquet:
            table = parquet.read(columns=["label", "pred", "pred_label"])
        for grouping in BY:
            values = table.column(grouping).drop_null()
            for cls, count in zip(*_value_counts(values)):
                entry = counts.setdefault((grouping, str(cls)), [0, []])
                entry[0] += count
                entry[1].append(shard)
        pairs = table.select(["pred", "pred_label"]).group_by(["pred", "pred_label"]).aggregate([])
        names.update(zip(map(str, pairs.column("pred").to_pylist()), pairs.column("pred_label").to_pylist()))
    if not counts:
        raise ValueError(f"{run.location} has no analysed images: nothing to cluster (run `lrpscale run` first, "
                         "or look at RUN/errors for why every input failed)")
    rows = [{"grouping": grouping, "class": cls, "class_name": names.get(cls, cls) if grouping == "pred" else cls,
             "images": count, "shards": shards} for (grouping, cls), (count, shards) in counts.items()]
    frame = pd.DataFrame(rows)
    order = sorted(range(len(frame)), key=lambda i: (BY.index(frame["grouping"].iat[i]), class_order(frame["class"].iat[i])))
    return frame.iloc[order].reset_index(drop=True)


def analyse_strategy_class(run: str | RunStore, files: list[str], grouping: str, cls: str,
                           settings: StrategySettings | None = None) -> ClassStrategyTables:
    """SpRAy of one class (``grouping`` "label" or "pred", ``cls`` the label or the prediction's
    index as a string): its rows, read from its bucket's partition ``files`` (``class_partitions``)
    in image_id order, go through ``analyse_class``; then per cluster its share, accuracy, prototype
    and distinguishing neurons (docs/method.md §18, "In a run"). The body of one Ray task of
    ``lrpscale.run.strategies``."""
    run = run if isinstance(run, RunStore) else RunStore(run)
    settings = settings or StrategySettings()
    if grouping not in BY:
        raise ValueError(f"grouping must be one of {', '.join(BY)}, got {grouping!r}")
    images, neurons = read_class(run, files, cls)
    if images.num_rows == 0:
        raise ValueError(f"no analysed image of class {cls!r} (by {grouping}) in {run.location}")
    maps = images.column("heatmap").combine_chunks().to_numpy_ndarray()
    if settings.features == "channels":
        channels = images.column("channel_relevance").combine_chunks()
        if channels.null_count:
            raise ValueError(f"{channels.null_count} images of class {cls!r} have no channel relevance in "
                             f"{run.location} (analysed before lrpscale stored it): use features 'heatmap'")
        features = channel_features(channels.to_numpy_ndarray())
    else:
        features = heatmap_features(maps)
    found = analyse_class(features, k=settings.k, n_eigval=settings.n_eigval, max_clusters=settings.max_clusters,
                          seed=settings.seed, cap=settings.cap)
    image_ids = images.column("image_id").to_pylist()
    count = len(image_ids)
    rows = pa.table({"grouping": [grouping] * count, "class": [cls] * count, "image_id": image_ids,
                     "cluster": found.cluster, "x": found.x, "y": found.y, "sampled": found.sampled}, schema=IMAGE_ROWS)
    correct = pc.fill_null(pc.equal(images.column("label_index"), images.column("pred")), False)
    correct = correct.to_numpy(zero_copy_only=False).astype(bool)
    clusters = _cluster_rows(grouping, cls, found.cluster, correct, maps, image_ids, neurons, settings.top_neurons)
    summary = {"grouping": grouping, "class": cls, "images": count, "sampled_images": int(found.sampled.sum()),
               "eigenvalues": found.eigenvalues.tolist(), "clusters": found.suggested_clusters,
               "eigengap": found.eigengap, "connectivity": found.connectivity, "neighbours": found.neighbours,
               **settings.to_dict()}
    return ClassStrategyTables(rows, summary, clusters)


def strategy_tables(parts: list[ClassStrategyTables], class_names: dict[tuple[str, str], str] | None = None
                    ) -> dict[str, pa.Table]:
    """The classes' results -> {"strategies", "strategy_classes", "strategy_clusters"} as Arrow
    tables. Ranks per grouping: connectivity ascending (NaN last), ties by class order; rank 1 is
    the class whose images fall most clearly into separate groups. class_names: (grouping, class)
    -> display name (``class_index``); the class itself where missing."""
    if not parts:
        raise ValueError("no classes to tabulate")
    names = class_names or {}
    summaries = pd.DataFrame([part.summary for part in parts])
    summaries.insert(2, "class_name", [names.get((g, c), c) for g, c in zip(summaries["grouping"], summaries["class"])])
    connectivity = summaries["connectivity"].to_numpy(np.float64)
    order = sorted(range(len(summaries)), key=lambda i: (
        BY.index(summaries["grouping"].iat[i]), math.isnan(connectivity[i]),
        0.0 if math.isnan(connectivity[i]) else connectivity[i], class_order(summaries["class"].iat[i])))
    summaries = summaries.iloc[order].reset_index(drop=True)
    summaries.insert(summaries.columns.get_loc("connectivity") + 1, "rank",
                     summaries.groupby("grouping").cumcount().astype(np.int64) + 1)
    classes = pa.Table.from_pandas(summaries, preserve_index=False)
    classes = classes.set_column(classes.schema.get_field_index("eigenvalues"), "eigenvalues",
                                 classes.column("eigenvalues").cast(pa.list_(pa.float64())))
    by_class = sorted(range(len(parts)), key=lambda i: (BY.index(parts[i].summary["grouping"]),
                                                         class_order(parts[i].summary["class"])))
    return {"strategies": pa.concat_tables([parts[i].images for i in by_class]),
            "strategy_classes": classes,
            "strategy_clusters": pa.concat_tables([parts[i].clusters for i in by_class])}


def write_strategies(run: RunStore, tables: dict[str, pa.Table], settings: StrategySettings, seconds: float) -> None:
    """The three tables under ``classes/`` (each written atomically), then ``strategies.json``
    (settings, counts, time, lrpscale version), which marks them complete."""
    for name, file in STRATEGY_FILES.items():
        run.write_parquet(f"{CLASSES}/{file}", tables[name])
    classes = tables["strategy_classes"]
    groupings = classes.column("grouping").to_pylist()
    clusters = classes.column("clusters").to_pylist()
    record = {"settings": settings.to_dict(), "time": time.time(), "seconds": seconds, "lrpscale": __version__,
              "classes": {by: groupings.count(by) for by in BY},
              "several_strategies": {by: sum(1 for g, c in zip(groupings, clusters) if g == by and c > 1) for by in BY},
              "images": {by: int(pc.sum(pc.equal(tables["strategies"].column("grouping"), by)).as_py() or 0) for by in BY}}
    run.write_bytes(f"{CLASSES}/{STRATEGY_SETTINGS}", json.dumps(record, indent=2).encode())


def compute_strategies(run: str | RunStore, settings: StrategySettings | None = None) -> dict[str, pa.Table]:
    """Every class of the run analysed here, one after another (no Ray; ``lrpscale.run.strategies``
    fans the parts and classes out over a cluster); returns ``strategy_tables``' tables and writes
    only the temporary partition files, which it removes."""
    run = run if isinstance(run, RunStore) else RunStore(run)
    settings = settings or StrategySettings()
    index = class_index(run)
    plan = plan_partitions(run, index, settings.features)
    try:
        files = bucket_files([write_partition(run, plan, part) for part in range(len(plan.parts))])
        parts = [analyse_strategy_class(run, files[plan.buckets[grouping, cls]], grouping, cls, settings)
                 for grouping, cls in zip(index["grouping"], index["class"])]
    finally:
        remove_partitions(run, plan)
    return strategy_tables(parts, class_names(index))


def class_names(index: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(grouping, class) -> display name, from ``class_index``."""
    return dict(zip(zip(index["grouping"], index["class"]), index["class_name"]))


def _value_counts(values: pa.Array) -> tuple[list, list]:
    counted = pc.value_counts(values)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _cluster_rows(grouping: str, cls: str, labels: np.ndarray, correct: np.ndarray, maps: np.ndarray,
                  image_ids: list[str], neurons: pd.DataFrame, top_neurons: int) -> pa.Table:
    """One row per cluster: images, share of the class, accuracy, prototype (the mean of the
    members' stored heatmaps, each divided by its sum of |values|, float32 (S, S)) and the
    distinguishing neurons."""
    count = len(labels)
    flat = maps.reshape(count, -1).astype(np.float32)
    flat /= np.maximum(np.abs(flat).sum(1, keepdims=True), 1e-30)
    found = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in found])
    distinguishing = distinguishing_neurons(labels, image_ids, neurons, top_neurons)
    return pa.table({
        "grouping": [grouping] * len(found), "class": [cls] * len(found), "cluster": pa.array(found, pa.int64()),
        "images": pa.array(sizes, pa.int64()), "share": pa.array(sizes / count, pa.float64()),
        "accuracy": pa.array([float(correct[labels == c].mean()) for c in found], pa.float64()),
        "prototype": tensor_column([flat[labels == c].mean(0) for c in found], list(maps.shape[1:]), pa.float32()),
        "distinguishing_neurons": pa.array([distinguishing.get(int(c), []) for c in found], pa.list_(DISTINGUISHING)),
    })


def distinguishing_neurons(labels: np.ndarray, image_ids: list[str], neurons: pd.DataFrame,
                           top: int = 5) -> dict[int, list[dict]]:
    """{cluster: up to ``top`` neurons whose selection frequency inside the cluster differs most
    from the rest of the class}, each {layer, neuron, frequency_inside, frequency_outside}.

    labels: (N,) cluster of each image in ``image_ids``; neurons: the class's selected neurons
    (image_id, layer, neuron), one row per image and neuron. frequency_inside = share of the
    cluster's images that selected the neuron, frequency_outside = share of the class's other
    images; ranked by |inside - outside| descending, then layer and neuron; a neuron with equal
    shares is left out, and a class of one cluster has none (there is no rest to differ from).
    """
    found, sizes = np.unique(labels, return_counts=True)
    if len(found) < 2 or top == 0 or neurons.empty:
        return {}
    cluster_of = pd.Series(labels, index=pd.Index(image_ids, name="image_id"), name="cluster")
    chosen = neurons.drop_duplicates(["image_id", "layer", "neuron"]).join(cluster_of, on="image_id", how="inner")
    counts = chosen.groupby(["layer", "neuron", "cluster"]).size().unstack("cluster", fill_value=0)
    counts = counts.reindex(columns=found, fill_value=0)
    inside = counts.to_numpy(np.float64)
    total, count = inside.sum(1, keepdims=True), len(labels)
    outside = (total - inside) / (count - sizes)[None, :]
    inside = inside / sizes[None, :]
    keys = counts.index.to_frame(index=False)
    result = {}
    for column, cluster in enumerate(found):
        ranked = keys.assign(frequency_inside=inside[:, column], frequency_outside=outside[:, column],
                             difference=np.abs(inside[:, column] - outside[:, column]))
        ranked = ranked[ranked["difference"] > 0].sort_values(["difference", "layer", "neuron"],
                                                                ascending=[False, True, True], kind="stable")
        result[int(cluster)] = [{"layer": str(r.layer), "neuron": int(r.neuron), "frequency_inside": float(r.frequency_inside),
                                 "frequency_outside": float(r.frequency_outside)} for r in ranked.head(top).itertuples()]
    return result
