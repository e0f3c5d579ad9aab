"""The reducer's pictures, drawn from the tables it wrote: a contact sheet of summary heatmaps
per grouping, a critical-path graph per class and the fidelity curves per swept layer. Kept
apart from the reducer so that the results side needs no matplotlib."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lrpscale.report.figures import contact_sheet, figure_png, path_graph_figure, score_curves_figure
from lrpscale.results.class_counts import class_order
from lrpscale.results.reducer import reduce_run
from lrpscale.results.run import Run
from lrpscale.storage.store import CLASSES, safe_name
from lrpscale.storage.tables import square_picture


def reduce_with_pictures(run: str | Path | Run, pictures: bool = True, **options) -> Path | str:
    """``reduce_run`` (``options`` go to it), then, unless ``pictures`` is False, the class
    pictures. Returns the classes folder."""
    run = run if isinstance(run, Run) else Run(run)
    classes = reduce_run(run.store, **options)
    if pictures:
        write_class_pictures(run)
    return classes


def write_class_pictures(run: str | Path | Run) -> list[str]:
    """Draw the pictures of a reduced run into ``RUN/classes/``: ``contact_sheet_<by>.png``,
    ``graphs/<by>-<class>.png`` and ``k_curves_<by>_<layer>.png``, for the classes the reducer's
    ``summary.json`` names under ``picture_classes``. Returns the paths written."""
    run = run if isinstance(run, Run) else Run(run)
    store = run.store
    summary = json.loads(store.read_bytes(f"{CLASSES}/summary.json"))
    pictured = {(by, cls) for by, names in summary["picture_classes"].items() for cls in names}
    labels = run.layer_labels
    written = []

    def save(figure, name: str) -> None:
        store.write_bytes(f"{CLASSES}/{name}", figure_png(figure))
        written.append(store.classes_path(name))

    frame = run.class_heatmaps
    frame = frame[[(b, c) in pictured for b, c in zip(frame["by"], frame["class"])]]
    for by, group in frame.groupby("by"):
        group = group.sort_values("class", key=lambda column: column.map(class_order))
        maps = [square_picture(h) for h in group["heatmap"]]
        titles = [f"{name}\nn={n}, acc {acc:.0%}" for name, n, acc in
                  zip(group["class_name"], group["images"], group["accuracy"])]
        what = "true label" if by == "label" else "prediction"
        save(contact_sheet(maps, titles, title=f"Mean normalised LRP heatmap per class, by {what}"),
             f"contact_sheet_{by}.png")
    for by, cls in sorted(pictured, key=lambda key: (key[0], class_order(key[1]))):
        graph = run.class_graph(cls, by, summary["top_nodes"], summary["min_edge_frequency"])
        if graph.number_of_nodes() == 0:
            continue
        figure = path_graph_figure(graph, title=f"class {cls} (by {by}): most frequent critical neurons",
                                   layer_labels=labels, size_attr="frequency", width_attr="relevance")
        save(figure, f"graphs/{by}-{safe_name(cls)}.png")
    curves = run.k_curves
    shown = np.array([(b, c) in pictured for b, c in zip(curves["by"], curves["class"])], dtype=bool)
    fidelity = curves[(curves["variant"] == "fidelity").to_numpy() & shown]
    for (by, layer), group in fidelity.groupby(["by", "layer"]):
        ks = sorted(group["k"].unique())
        scores = {}
        for cls, rows in group.groupby("class"):
            rows = rows.set_index("k").reindex(ks)
            scores[str(cls)] = (rows["mean_mse"].to_numpy(), rows["mean_smape"].to_numpy())
        label = labels.get(layer, layer)
        figure = score_curves_figure(ks, scores, title=f"fidelity of the top-k neurons of {label}, per class (by {by})")
        save(figure, f"k_curves_{by}_{safe_name(layer)}.png")
    return written
