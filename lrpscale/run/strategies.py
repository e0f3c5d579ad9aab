"""SpRAy over a run on Ray: one task per part of the run regroups its rows by class (one pass over
the shards, ``results.class_partitions``), then one task per (grouping, class) clusters it, so the
classes of a large run are clustered in parallel across a cluster; the driver gathers the small
per-class tables and writes them under ``RUN/classes/`` (docs/method.md §18, "In a run").

    summary = run_strategies("runs/audit")              # features from the stored heatmaps
    summary = run_strategies("runs/audit", features="channels", cap=5000)
    summary = run_strategies("runs/audit", references=False)   # without the reference images per neuron

Each class task reads only its class's rows (from its bucket's partition files, skipping the
other classes' row groups) and returns its images' clusters and positions, one summary row and its
clusters' rows. The partition files are removed at the end, whatever happened.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lrpscale.results.class_partitions import bucket_files, plan_partitions, remove_partitions, write_partition
from lrpscale.results.run import Run
from lrpscale.results.strategies import (
    StrategySettings,
    analyse_strategy_class,
    class_index,
    class_names,
    strategy_tables,
    write_strategies,
)
from lrpscale.run.progress import gather
from lrpscale.run.references import ReferencesSummary, remove_references, run_references
from lrpscale.run.session import ensure_ray, storage_options
from lrpscale.storage.store import CLASSES, RunStore

log = logging.getLogger(__name__)


@dataclass
class StrategiesSummary:
    """What ``run_strategies`` did: the classes table (one row per grouping and class, in rank
    order), where the tables went, how long it took (in all, and per stage: index, regroup,
    classes, write), and the reference images (None when skipped)."""

    classes: pd.DataFrame
    location: Path | str
    seconds: float
    settings: StrategySettings
    references: ReferencesSummary | None = None
    stages: dict[str, float] = field(default_factory=dict)

    def text(self, rows: int = 5) -> str:
        """A few lines for the command line: per grouping the classes, how many split, and the
        ``rows`` classes to look at first."""
        lines = []
        for grouping, what in (("label", "by label"), ("pred", "by prediction")):
            mine = self.classes[self.classes["grouping"] == grouping].sort_values("rank")
            if mine.empty:
                continue
            several = int((mine["clusters"] > 1).sum())
            first = ", ".join(f"{name} ({connectivity:.3g}, {clusters} clusters)" for name, connectivity, clusters
                              in zip(mine["class_name"].head(rows), mine["connectivity"].head(rows),
                                     mine["clusters"].head(rows)))
            lines.append(f"{what}: {len(mine)} classes, {several} with more than one strategy; look here first "
                         f"(lowest connectivity): {first}")
        return "\n".join(lines) + "\n"


def run_strategies(run: str | Path | RunStore, features: str = "heatmap", cap: int = 20000, seed: int = 0,
                   address: str | None = None, k: int = 10, n_eigval: int = 32, max_clusters: int = 10,
                   top_neurons: int = 5, references: bool = True) -> StrategiesSummary:
    """SpRAy of every class of a run, by label and by prediction: the rows regrouped by class (one Ray
    task per part of the run), then one Ray task per class (Ray is joined at ``address`` /
    RAY_ADDRESS or started locally when not running yet); writes
    ``classes/strategies.parquet``, ``strategy_classes.parquet``, ``strategy_clusters.parquet``
    and ``strategies.json``; then, unless ``references`` is False, the reference images of the
    clusters' distinguishing neurons (``run_references``: ``references.parquet``; references of
    earlier strategies are removed either way). Settings as in ``StrategySettings``, checked before Ray starts.
    Raises ValueError for a run without analysed images, or without channel relevance when
    ``features="channels"``."""
    import ray

    settings = StrategySettings(features=features, k=k, n_eigval=n_eigval, max_clusters=max_clusters, seed=seed,
                                cap=cap, top_neurons=top_neurons)
    store = run if isinstance(run, RunStore) else RunStore(run)
    Run(store)  # a folder without run.json is named as such
    started = time.time()
    stages = {}
    index = class_index(store)
    plan = plan_partitions(store, index, features)  # refuses channel features of a run without them
    stages["index"] = time.time() - started
    ensure_ray(address)
    # workers may start in another folder: a local run goes to them by its absolute path
    location = os.fspath(store.local_path() or store.location)
    options = {"num_cpus": 1, **storage_options()}
    log.info("strategies: %d classes (%d by label, %d by prediction), %s features; regrouping the rows of %d "
             "shards by class in %d Ray tasks", len(index), int((index["grouping"] == "label").sum()),
             int((index["grouping"] == "pred").sum()), features, sum(map(len, plan.parts)), len(plan.parts))
    remove_partitions(store)  # what a killed earlier pass left
    try:
        stage = time.time()
        regroup = ray.remote(**options)(write_partition)
        plan_ref = ray.put(plan)  # its shard names and buckets go to the object store once, not once per task
        written = gather([regroup.remote(location, plan_ref, part) for part in range(len(plan.parts))],
                         "strategies: parts regrouped", started)
        files = bucket_files(written)
        stages["regroup"], stage = time.time() - stage, time.time()
        task = ray.remote(**options)(analyse_strategy_class)
        parts = gather([task.remote(location, files[plan.buckets[grouping, cls]], grouping, cls, settings)
                        for grouping, cls in zip(index["grouping"], index["class"])], "strategies: classes done", started)
        stages["classes"] = time.time() - stage
    finally:
        remove_partitions(store, plan)
    stage = time.time()
    tables = strategy_tables(parts, class_names(index))
    seconds = time.time() - started
    remove_references(store)  # chosen for the clusters about to be replaced
    write_strategies(store, tables, settings, seconds)
    stages["write"] = time.time() - stage
    found = run_references(store, address) if references else None
    local = store.local_path()
    return StrategiesSummary(tables["strategy_classes"].to_pandas(), local / CLASSES if local else store.classes_path(),
                             seconds, settings, found, stages)

