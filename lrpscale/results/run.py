"""Opening a run for pandas users: every table as a DataFrame, plus the helpers an auditor needs.

    run = open_run("lrpscale-demo/run")
    run.images.groupby("label").apply(lambda d: (d.pred_label == d.label).mean())
    run.heatmap("3/0042.png")          # (56, 56) array
    run.class_graph("3")               # networkx DiGraph of class 3's critical path

Only committed shards are read, so a run that is still going (or crashed) shows exactly the
images it has finished, each once.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from lrpscale.graph import path_graph
from lrpscale.results.reducer import CHOSEN_SCORES, FAITHFULNESS_CURVES, class_graph
from lrpscale.storage import tables
from lrpscale.storage.store import CLASSES, EVALUATION, RunStore
from lrpscale.storage.tables import square_picture

# What ``lrpscale evaluate`` writes into RUN/evaluation/<settings id>/ (lrpscale.run.evaluation)
EVALUATION_TABLES = ("faithfulness", "aopc", "randomisation")
EVALUATION_SETTINGS = "settings.json"
EVALUATION_SUMMARY = "summary.json"
# What ``lrpscale strategies`` writes into RUN/classes/ (lrpscale.results.strategies); the settings
# file comes last, so the tables are complete once it exists
STRATEGY_FILES = {"strategies": "strategies.parquet", "strategy_classes": "strategy_classes.parquet",
                  "strategy_clusters": "strategy_clusters.parquet"}
STRATEGY_SETTINGS = "strategies.json"


class Run:
    """A run directory. Tables are read lazily and cached: ``images``, ``neurons``, ``scores``,
    ``edges``, ``deconv``, ``faithfulness``, ``errors`` (pandas DataFrames)."""

    def __init__(self, path: str | Path | RunStore):
        self.store = path if isinstance(path, RunStore) else RunStore(path)
        # a local run keeps a Path, for users who join file names onto it
        self.path = self.store.local_path() or self.store.location
        info = self.store.read_json()
        if info is None:
            raise FileNotFoundError(f"{self.store.location} is not an lrpscale run (no run.json); "
                                    "pass the directory given to `lrpscale run --output`")
        self.info = info

    @property
    def layer_labels(self) -> dict[str, str]:
        """Module name -> VGG alias (features.28 -> conv5_3), as the audit recorded it."""
        return dict(self.info.get("layers") or {})

    @property
    def committed_shards(self) -> int:
        return len(self.store.committed())

    @property
    def is_complete(self) -> bool:
        """Whether every shard of the run's listing is committed (a crashed or running run is not)."""
        shards = self.info.get("shards")
        return self.info.get("status") == "complete" and shards is not None and self.committed_shards >= shards

    def incomplete_note(self) -> str | None:
        """One line saying the run is incomplete and what that means, or None for a complete run."""
        if self.is_complete:
            return None
        return (f"run {self.info.get('run_id')} at {self.store.location} is incomplete: {self.committed_shards} of "
                f"{self.info.get('shards', '?')} shards committed (status {self.info.get('status')}); its results "
                "cover those shards only. Run the same `lrpscale run` command to finish it")

    @property
    def architecture(self) -> str | None:
        return (self.info.get("config") or {}).get("model")

    def files(self, table: str) -> list[str]:
        return self.store.committed_files(table)

    def arrow(self, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        """A table as Arrow, with column projection and a pyarrow filter pushed down."""
        files = self.files(table)
        if not files:
            return _empty(table)
        return ds.dataset(files, format="parquet", filesystem=self.store.fs).to_table(columns=columns, filter=filter)

    def table(self, table: str, columns: list[str] | None = None, filter=None) -> pd.DataFrame:
        return self.arrow(table, columns, filter).to_pandas()

    images = cached_property(lambda self: self.table("images"))
    neurons = cached_property(lambda self: self.table("neurons"))
    scores = cached_property(lambda self: self.table("scores"))
    edges = cached_property(lambda self: self.table("edges"))
    deconv = cached_property(lambda self: self.table("deconv"))
    faithfulness = cached_property(lambda self: self.table("faithfulness"))
    errors = cached_property(lambda self: self.table("errors"))

    def heatmap(self, image_id: str) -> np.ndarray:
        """The stored low-resolution heatmap of one image, (s, s) float32, in relevance units."""
        table = self.arrow("images", ["heatmap", "heatmap_scale"], ds.field("image_id") == image_id)
        if table.num_rows == 0:
            raise KeyError(f"no analysed image {image_id!r} in {self.path}")
        picture = table.column("heatmap").combine_chunks().to_numpy_ndarray()[0].astype(np.float32)
        return picture * table.column("heatmap_scale")[0].as_py()

    def heatmaps(self, images: pd.DataFrame | None = None) -> np.ndarray:
        """(N, s, s) stacked heatmaps of a selection of the images table (all by default)."""
        images = self.images if images is None else images
        if not len(images):
            side = self.arrow("images", ["heatmap"]).schema.field("heatmap").type.shape[0] if self.files("images") else 0
            return np.zeros((0, side, side), np.float32)
        return np.stack([square_picture(h) * s for h, s in zip(images["heatmap"], images["heatmap_scale"])])

    def reconstruction(self, image_id: str, layer: str, neuron: int) -> np.ndarray:
        """A stored deconvolution, (3, d, d) float32."""
        table = self.arrow("deconv", ["layer", "neuron", "reconstruction", "scale"], ds.field("image_id") == image_id)
        rows = [i for i, (l, n) in enumerate(zip(table.column("layer").to_pylist(), table.column("neuron").to_pylist()))
                if l == layer and n == neuron]
        if not rows:
            raise KeyError(f"no reconstruction of {layer}:{neuron} for {image_id!r}")
        pictures = table.column("reconstruction").combine_chunks().to_numpy_ndarray()
        return pictures[rows[0]].astype(np.float32) * table.column("scale")[rows[0]].as_py()

    def image_graph(self, image_id: str) -> nx.DiGraph:
        """One image's critical path from the neurons and edges tables."""
        where = ds.field("image_id") == image_id
        nodes = self.table("neurons", filter=where).to_dict("records")
        edges = self.table("edges", filter=where).to_dict("records")
        path = {(e["layer_from"], e["neuron_from"]) for e in edges} | {(e["layer_to"], e["neuron_to"]) for e in edges}
        return path_graph([n for n in nodes if (n["layer"], n["neuron"]) in path], edges)

    @cached_property
    def class_nodes(self) -> pd.DataFrame:
        return self._classes_table("nodes.parquet")

    @cached_property
    def class_edges(self) -> pd.DataFrame:
        return self._classes_table("edges.parquet")

    @cached_property
    def class_heatmaps(self) -> pd.DataFrame:
        return self._classes_table("summary_heatmaps.parquet")

    @cached_property
    def k_curves(self) -> pd.DataFrame:
        return self._classes_table("k_curves.parquet")

    @cached_property
    def faithfulness_curves(self) -> pd.DataFrame:
        """Mean region perturbation curves per class and order (reducer; docs/method.md §16)."""
        return self._classes_table(FAITHFULNESS_CURVES)

    @cached_property
    def chosen_scores(self) -> pd.DataFrame:
        """The scores at each image's chosen k, one row per image, layer and variant (reducer)."""
        return self._classes_table(CHOSEN_SCORES)

    @cached_property
    def strategies(self) -> pd.DataFrame:
        """SpRAy (``lrpscale strategies``): per grouping, class and image its cluster, t-SNE
        position (x, y) and whether it was in the clustered sample."""
        return self._classes_table(STRATEGY_FILES["strategies"], command="strategies")

    @cached_property
    def strategy_classes(self) -> pd.DataFrame:
        """SpRAy per class: eigenvalues, suggested clusters, eigengap, connectivity, rank (1 = look
        here first) and the settings."""
        return self._classes_table(STRATEGY_FILES["strategy_classes"], command="strategies")

    @cached_property
    def strategy_clusters(self) -> pd.DataFrame:
        """SpRAy per cluster: images, share, accuracy, prototype heatmap, distinguishing neurons."""
        return self._classes_table(STRATEGY_FILES["strategy_clusters"], command="strategies")

    @cached_property
    def references(self) -> pd.DataFrame:
        """Reference images per neuron (``lrpscale strategies``): layer, neuron, scope ("run" or
        "class" and its grouping and class), rank, image_id, score, measure and the crop; empty
        until ``lrpscale strategies`` has written them all."""
        from lrpscale.results.references import read_references  # it reads runs: imported here, not at the top

        return read_references(self.store)

    @property
    def has_strategies(self) -> bool:
        return self.store.is_file(CLASSES, STRATEGY_SETTINGS)

    @property
    def is_reduced(self) -> bool:
        return self.store.is_file(CLASSES, "summary_heatmaps.parquet")

    def worst_explained(self, count: int = 100, variant: str = "fidelity") -> pd.DataFrame:
        """The ``count`` images whose selected neurons reproduce their heatmap worst: the highest
        SMAPE at the chosen k, one row per image (its worst layer), from the reducer's one-file
        table of chosen-k scores."""
        rows = self._classes_table(CHOSEN_SCORES, filters=[("variant", "==", variant)])
        rows = rows.sort_values(["smape", "image_id"], ascending=[False, True], ignore_index=True)
        return rows.drop_duplicates("image_id").head(count).reset_index(drop=True)

    def class_graph(self, cls: str, by: str = "label", top_nodes: int = 8, min_edge_frequency: float = 0.1) -> nx.DiGraph:
        """A class's aggregated critical path (from the reducer's tables)."""
        return class_graph(self.class_nodes, self.class_edges, by, str(cls), top_nodes, min_edge_frequency)

    def class_heatmap(self, cls: str, by: str = "label") -> np.ndarray:
        rows = self.class_heatmaps[(self.class_heatmaps["by"] == by) & (self.class_heatmaps["class"] == str(cls))]
        if rows.empty:
            raise KeyError(f"no class {cls!r} (by {by}) in {self.path}; run `lrpscale reduce {self.path}`")
        return square_picture(rows["heatmap"].iloc[0])

    def evaluations(self) -> pd.DataFrame:
        """The run's evaluations (``lrpscale evaluate``), oldest first: one row per settings id with
        ``settings_id``, ``time`` (when it was written, seconds since the epoch) and every setting
        (``methods`` as a list); empty when there is none. A folder without its settings.json (an
        evaluation that did not finish) is left out."""
        rows = []
        for entry in self.store.entries(EVALUATION):
            if self.store.is_file(EVALUATION, entry.base_name, EVALUATION_SETTINGS):
                written = json.loads(self.store.read_bytes(f"{EVALUATION}/{entry.base_name}/{EVALUATION_SETTINGS}"))
                rows.append({"settings_id": entry.base_name, "time": written.get("time"), **written.get("settings", {})})
        if not rows:
            return pd.DataFrame(columns=["settings_id", "time"])
        return pd.DataFrame(rows).sort_values(["time", "settings_id"], ignore_index=True)

    def evaluation(self, table: str, settings_id: str | None = None) -> pd.DataFrame:
        """One table of an evaluation: ``faithfulness``, ``aopc`` or ``randomisation`` (columns in
        ``lrpscale.run.evaluation``), of ``settings_id`` or, when None, the latest evaluation."""
        if table not in EVALUATION_TABLES:
            raise KeyError(f"unknown evaluation table {table!r}; choose from {', '.join(EVALUATION_TABLES)}")
        settings_id = self._evaluation_id(settings_id)
        return self.store.read_parquet(f"{EVALUATION}/{settings_id}/{table}.parquet").to_pandas()

    def evaluation_summary(self, settings_id: str | None = None) -> dict:
        """An evaluation's summary.json (``most_faithful``, per-method ``methods`` rows, images,
        seconds) of ``settings_id`` or, when None, the latest evaluation."""
        settings_id = self._evaluation_id(settings_id)
        return json.loads(self.store.read_bytes(f"{EVALUATION}/{settings_id}/{EVALUATION_SUMMARY}"))

    def _evaluation_id(self, settings_id: str | None) -> str:
        done = self.evaluations()
        if done.empty:
            raise FileNotFoundError(f"{self.store.location} has no evaluation; run `lrpscale evaluate {self.store.location}`")
        if settings_id is None:
            return done["settings_id"].iloc[-1]
        if settings_id not in set(done["settings_id"]):
            raise KeyError(f"no evaluation {settings_id!r} in {self.store.location}; it has: {', '.join(done['settings_id'])}")
        return settings_id

    def _classes_table(self, name: str, command: str = "reduce", **options) -> pd.DataFrame:
        """A table the reducer (or ``command``) wrote, as pandas."""
        if not self.store.is_file(CLASSES, name):
            raise FileNotFoundError(f"{self.store.classes_path(name)} is missing; "
                                    f"run `lrpscale {command} {self.store.location}` first")
        return self.store.read_parquet(f"{CLASSES}/{name}", **options).to_pandas()


def open_run(path: str | Path) -> Run:
    """Open a run directory written by ``lrpscale run`` (or ``demo``)."""
    return Run(path)


def _empty(table: str) -> pa.Table:
    schemas = {"images": tables.images_schema(1), "neurons": tables.NEURONS, "scores": tables.SCORES,
               "edges": tables.EDGES, "deconv": tables.deconv_schema(1), "faithfulness": tables.FAITHFULNESS,
               "errors": tables.ERRORS}
    return schemas[table].empty_table()
