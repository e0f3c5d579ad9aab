"""A run's rows regrouped by class in one pass over its shards, so that each class's SpRAy task
reads its own rows only (docs/method.md §18, "At scale").

A class by prediction lies in almost every shard of a large run: its misclassified images are
spread over the whole dataset. Read straight from the shards, each class would read the heatmap
column of hundreds of shards to keep a few rows of each, and the run's heatmaps would be decoded
once per class. Instead, each *part* (a range of shards) is read once: its rows, with their
selected neurons as list columns, go to one file per *bucket* (a few consecutive classes of one
grouping), sorted by class with one row group per class. A class's task then reads the files of
its bucket, and Parquet's row-group statistics skip the other classes' rows. Every row is read
twice and written once, whatever the number of classes.

    plan = plan_partitions(run, class_index(run), features="heatmap")
    written = [write_partition(run, plan, part) for part in range(len(plan.parts))]
    files = bucket_files(written)
    images, neurons = read_class(run, files[plan.buckets["pred", "3"]], "3")
    remove_partitions(run, plan)

The files lie under ``classes/_partitions/<token>/`` and are removed when the strategies are
written (``remove_partitions``); a token per pass keeps a killed pass's files apart from the next
pass's, which removes them before it starts.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lrpscale.results.class_counts import BY
from lrpscale.storage.store import CLASSES, RunStore, new_attempt

PARTITIONS = f"{CLASSES}/_partitions"
PART_IMAGES = 16384    # images one part reads at once: its heatmaps are ~100 MB at 56x56 float16
BUCKET_ROWS = 32768    # rows per bucket (whole classes): a bucket's part files stay few and large
TAKE_ROWS = 2048       # rows gathered at once while writing: a part never holds a second copy of its rows
IMAGE_COLUMNS = ("image_id", "label_index", "pred", "heatmap")  # what a class's SpRAy reads of each image
CHANNELS = "channel_relevance"


@dataclass(frozen=True)
class PartitionPlan:
    """One regrouping pass. directory: its folder, relative to the run; parts: per part, the base
    names of the images files it reads (the same shard's file in every table has the same name);
    buckets: (grouping, class) -> bucket; columns: the images columns carried."""

    directory: str
    parts: tuple[tuple[str, ...], ...]
    buckets: dict[tuple[str, str], int]
    columns: tuple[str, ...]


def plan_partitions(run: RunStore, index: pd.DataFrame, features: str = "heatmap", part_images: int = PART_IMAGES,
                    bucket_rows: int = BUCKET_ROWS) -> PartitionPlan:
    """The parts and buckets for ``index`` (``strategies.class_index``: grouping, class, images,
    shards). Parts take consecutive shards, about ``part_images`` images each; buckets take
    consecutive classes of one grouping until they hold ``bucket_rows`` images (a larger class is a
    bucket of its own). ``features="channels"`` carries the channel relevance too, and raises
    ValueError naming the way out when the run does not store it."""
    columns = IMAGE_COLUMNS
    if features == "channels":
        files = run.committed_files("images")
        if not files or CHANNELS not in run.parquet_file(files[0]).schema_arrow.names:
            raise ValueError(f"{run.location} stores no channel relevance (analysed before lrpscale stored it): "
                             "use --features heatmap, or analyse the images again")
        columns = (*IMAGE_COLUMNS, CHANNELS)
    shards = sorted({shard for names in index["shards"] for shard in names})
    images = int(index.loc[index["grouping"] == "pred", "images"].sum()) or int(index["images"].sum())
    per_part = max(1, math.floor(part_images * len(shards) / max(images, 1)))
    parts = tuple(tuple(shards[start:start + per_part]) for start in range(0, len(shards), per_part))
    buckets, bucket, filled, grouping_now = {}, -1, bucket_rows, None
    for grouping, cls, count in zip(index["grouping"], index["class"], index["images"]):
        if grouping != grouping_now or filled >= bucket_rows:
            bucket, filled, grouping_now = bucket + 1, 0, grouping
        buckets[(grouping, str(cls))] = bucket
        filled += int(count)
    return PartitionPlan(f"{PARTITIONS}/{new_attempt()}", parts, buckets, columns)


def write_partition(run: str | RunStore, plan: PartitionPlan, part: int) -> dict[int, str]:
    """Read part ``part``'s shards once (the plan's images columns, label, and the neurons table's
    image_id, layer, neuron) and write each bucket's rows to
    ``<directory>/bucket-BBBBB/part-PPPPP.parquet``: columns class, the plan's columns, layer
    (list<string>) and neuron (list<int32>), the image's selected neurons; sorted by class, then
    image_id; one row group per class. Returns {bucket: file relative to the run}. The body of one
    Ray task of ``lrpscale.run.strategies``: ``run`` may be its location."""
    run = run if isinstance(run, RunStore) else RunStore(run)
    shards = set(plan.parts[part])
    images = _with_neuron_lists(_read_shards(run, "images", shards, [*plan.columns, "label"]),
                                _read_shards(run, "neurons", shards, ["image_id", "layer", "neuron"]))
    carried = images.select([*plan.columns, "layer", "neuron"])
    schema = carried.schema.insert(0, pa.field("class", pa.string()))
    written = {}
    for grouping in BY:
        classes = pc.cast(images.column(grouping), pa.string()).combine_chunks()
        buckets = np.array([-1 if cls is None else plan.buckets[(grouping, cls)] for cls in classes.to_pylist()],
                           dtype=np.int64)
        keys = pa.table({"bucket": buckets, "class": classes, "image_id": images.column("image_id")})
        # one ordering, then TAKE_ROWS rows gathered at a time
        order = pc.sort_indices(keys, [("bucket", "ascending"), ("class", "ascending"), ("image_id", "ascending")])
        order = order.to_numpy()
        ordered_buckets = buckets[order]
        ordered_classes = classes.take(pa.array(order))
        new_run = np.flatnonzero(np.r_[True, (ordered_buckets[1:] != ordered_buckets[:-1])
                                       | pc.fill_null(pc.not_equal(ordered_classes[1:], ordered_classes[:-1]), True)
                                       .to_numpy(zero_copy_only=False)])
        bounds = np.r_[new_run, len(order)]
        # (start, stop) of each class's rows, grouped by bucket (rows without a class sort first, bucket -1)
        for bucket, runs in itertools.groupby(zip(bounds[:-1], bounds[1:]), key=lambda span: ordered_buckets[span[0]]):
            if bucket < 0:
                continue
            runs = list(runs)
            relative = f"{plan.directory}/bucket-{bucket:05d}/part-{part:05d}.parquet"
            with run.open_atomic(relative) as stream, pq.ParquetWriter(stream, schema, compression="lz4") as out:
                for chunk in _chunks(runs, TAKE_ROWS):
                    first, last = chunk[0][0], chunk[-1][1]
                    rows = carried.take(pa.array(order[first:last]))
                    rows = rows.add_column(0, "class", ordered_classes.slice(first, last - first))
                    for start, stop in chunk:  # a row group per class: a class's reader skips the others by their statistics
                        out.write_table(rows.slice(start - first, stop - start))
            written[int(bucket)] = relative
    return written


def _chunks(runs: list[tuple[int, int]], rows: int) -> list[list[tuple[int, int]]]:
    """Consecutive (start, stop) runs grouped into chunks of about ``rows`` rows (a longer run is a
    chunk of its own): one take per chunk instead of one per class."""
    chunks, size = [], rows
    for start, stop in runs:
        if size >= rows:
            chunks.append([])
            size = 0
        chunks[-1].append((start, stop))
        size += stop - start
    return chunks


def bucket_files(written: list[dict[int, str]]) -> dict[int, list[str]]:
    """The parts' ``write_partition`` results -> {bucket: its files, in part order}."""
    files = defaultdict(list)
    for part in written:
        for bucket, relative in part.items():
            files[bucket].append(relative)
    return dict(files)


def read_class(run: RunStore, files: list[str], cls: str) -> tuple[pa.Table, pd.DataFrame]:
    """One class's rows from its bucket's files: the images (the plan's columns, in image_id
    order) and their selected neurons (image_id, layer, neuron; one row per image and neuron)."""
    if not files:
        raise ValueError(f"no partition files for class {cls!r}")
    dataset = ds.dataset([run.path(relative) for relative in files], format="parquet", filesystem=run.fs)
    rows = dataset.to_table(filter=ds.field("class") == cls).sort_by("image_id")
    layers, numbers = rows.column("layer").combine_chunks(), rows.column("neuron").combine_chunks()
    owners = pc.take(rows.column("image_id"), pc.list_parent_indices(layers))
    neurons = pd.DataFrame({"image_id": owners.to_numpy(zero_copy_only=False),
                            "layer": pc.list_flatten(layers).to_numpy(zero_copy_only=False),
                            "neuron": pc.list_flatten(numbers).to_numpy(zero_copy_only=False)})
    return rows.drop_columns(["class", "layer", "neuron"]), neurons


def remove_partitions(run: RunStore, plan: PartitionPlan | None = None) -> None:
    """Delete one pass's files, or (plan None) every pass's, such as a killed pass left."""
    folder = plan.directory if plan else PARTITIONS
    if run.is_dir(*folder.split("/")):
        run.fs.delete_dir(run.path(folder))
    if plan and run.is_dir(*PARTITIONS.split("/")) and not run.entries(*PARTITIONS.split("/")):
        run.fs.delete_dir(run.path(PARTITIONS))  # the last pass leaves no empty folder behind


def _read_shards(run: RunStore, table: str, shards: set[str], columns: list[str]) -> pa.Table:
    files = [path for path in run.committed_files(table) if path.rpartition("/")[2] in shards]
    return ds.dataset(files, format="parquet", filesystem=run.fs).to_table(columns=columns)


def _with_neuron_lists(images: pa.Table, neurons: pa.Table) -> pa.Table:
    """images plus columns layer (list<string>) and neuron (list<int32>): each image's rows of
    ``neurons`` (empty lists for an image without any)."""
    neurons = neurons.sort_by("image_id")
    owners = neurons.column("image_id").combine_chunks()
    # where each owner's run of rows starts in the sorted table
    starts = np.flatnonzero(np.r_[True, pc.not_equal(owners[1:], owners[:-1]).to_numpy(zero_copy_only=False)]) \
        if len(owners) else np.zeros(0, np.int64)
    # one list per owner, then one more, empty, for the images without neurons
    offsets = pa.array(np.r_[starts, len(owners), len(owners)].astype(np.int32))
    position = pc.index_in(images.column("image_id"), value_set=pc.take(owners, pa.array(starts)))
    position = pc.fill_null(position, pa.scalar(len(starts), pa.int32()))
    layer = pa.ListArray.from_arrays(offsets, neurons.column("layer").combine_chunks().cast(pa.string()))
    neuron = pa.ListArray.from_arrays(offsets, neurons.column("neuron").combine_chunks().cast(pa.int32()))
    return images.append_column("layer", layer.take(position)).append_column("neuron", neuron.take(position))
