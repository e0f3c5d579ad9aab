"""The regrouping of a run's rows by class (lrpscale.results.class_partitions): on a hand-made run
whose classes are spread over several shards, with several parts and buckets forced by small
sizes, every class reads back exactly its rows and selected neurons, as pandas finds them in the
run's own tables; each class is one row group; the files go when asked."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lrpscale.results import open_run
from lrpscale.results.class_partitions import (
    PARTITIONS,
    bucket_files,
    plan_partitions,
    read_class,
    remove_partitions,
    write_partition,
)
from lrpscale.results.strategies import analyse_strategy_class, class_index, compute_strategies
from lrpscale.storage import tables
from tests.helpers.runs import image, neuron, record, result_table, write_run


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    """60 images of labels a..e and 2 unlabelled ones over 5 shards in a shuffled order;
    predictions wrong for every fourth image (then a random class); image i selects neurons
    conv:(i % 7) and fc:(i % 3), except every tenth image and the unlabelled ones, which select none."""
    rng = np.random.default_rng(11)
    rows = []
    for i in rng.permutation(60):
        label_index = int(i % 5)
        pred = label_index if i % 4 else int(rng.integers(0, 5))
        selected = [] if i % 10 == 0 else [neuron("conv", int(i % 7)), neuron("fc", int(i % 3), rank=1)]
        rows.append(image(f"{'abcde'[label_index]}/{i:03d}.png", "abcde"[label_index], label_index,
                          record(pred, rng.normal(0.0, 1.0, (4, 4)), neurons=selected,
                                 channel_relevance=rng.normal(0.0, 1.0, 3))))
    for i in range(2):  # unlabelled: by prediction only
        rows.insert(7 + 30 * i, image(f"u/{i}.png", None, None, record(1, rng.normal(0.0, 1.0, (4, 4)),
                                                                      channel_relevance=rng.normal(0.0, 1.0, 3))))
    return write_run(tmp_path_factory.mktemp("scattered") / "run",
                     {shard: result_table(rows[shard * 13:(shard + 1) * 13]) for shard in range(5)}, heatmap_side=4)


def partitioned(store, **sizes):
    plan = plan_partitions(store, class_index(store), "channels", **sizes)
    return plan, bucket_files([write_partition(store, plan, part) for part in range(len(plan.parts))])


def test_every_class_reads_back_exactly_its_rows_and_neurons(scattered):
    plan, files = partitioned(scattered, part_images=26, bucket_rows=20)  # 2 shards per part, ~2 classes per bucket
    assert len(plan.parts) == 3 and sorted(sum(plan.parts, ())) == sorted(
        path.rpartition("/")[2] for path in scattered.committed_files("images"))
    assert len(set(plan.buckets.values())) >= 4
    run = open_run(scattered.location)
    images = run.images.set_index("image_id")
    selected = run.neurons
    seen = {"label": [], "pred": []}
    for (grouping, cls), bucket in plan.buckets.items():
        rows, neurons = read_class(scattered, files[bucket], cls)
        expected = images[images[grouping].astype("string") == cls].sort_index()
        assert rows.column("image_id").to_pylist() == expected.index.tolist()
        assert rows.column("pred").to_pylist() == expected["pred"].tolist()
        assert pd.Series(rows.column("label_index").to_pylist(), dtype="Int64").tolist() == \
            expected["label_index"].astype("Int64").tolist()
        stored = np.stack([tables.square_picture(h) for h in expected["heatmap"]])
        assert np.array_equal(rows.column("heatmap").combine_chunks().to_numpy_ndarray().reshape(stored.shape), stored)
        assert np.array_equal(rows.column("channel_relevance").combine_chunks().to_numpy_ndarray(),
                              np.stack(expected["channel_relevance"].to_numpy()))
        mine = selected[selected["image_id"].isin(expected.index)][["image_id", "layer", "neuron"]]
        assert sorted(map(tuple, neurons.to_numpy().tolist())) == sorted(map(tuple, mine.to_numpy().tolist()))
        seen[grouping] += rows.column("image_id").to_pylist()
    # each image once per grouping (the unlabelled ones by prediction only)
    assert sorted(seen["pred"]) == sorted(images.index) and len(images) == 62
    assert sorted(seen["label"]) == sorted(images.index[images["label"].notna()]) and len(seen["label"]) == 60
    for paths in files.values():
        for relative in paths:  # one row group per class, so a class's reader skips the others
            table = pq.read_table(scattered.path(relative), columns=["class"])
            assert pq.ParquetFile(scattered.path(relative)).metadata.num_row_groups == len(set(table.column(0).to_pylist()))
    remove_partitions(scattered, plan)
    assert not scattered.exists(PARTITIONS, plan.directory.rpartition("/")[2])


def test_one_part_and_one_bucket_per_grouping_by_default(scattered):
    plan = plan_partitions(scattered, class_index(scattered))
    assert len(plan.parts) == 1 and sorted(set(plan.buckets.values())) == [0, 1]
    assert "channel_relevance" not in plan.columns


def test_compute_strategies_leaves_no_partition_behind_and_is_independent_of_the_sizes(scattered):
    default = compute_strategies(scattered)
    assert not scattered.exists(*PARTITIONS.split("/"))
    # a killed pass's files are removed by remove_partitions without a plan
    plan, _ = partitioned(scattered, part_images=12, bucket_rows=1)
    assert scattered.exists(*plan.directory.split("/"))
    remove_partitions(scattered)
    assert not scattered.exists(*PARTITIONS.split("/"))
    small = plan_partitions(scattered, class_index(scattered), part_images=12, bucket_rows=1)
    assert len(small.parts) == 5 and len(set(small.buckets.values())) == len(small.buckets)
    # the clusters do not depend on how the rows were regrouped
    files = bucket_files([write_partition(scattered, small, part) for part in range(len(small.parts))])
    for grouping, cls in small.buckets:
        part = analyse_strategy_class(scattered, files[small.buckets[grouping, cls]], grouping, cls)
        rows = default["strategies"].to_pandas()
        rows = rows[(rows["grouping"] == grouping) & (rows["class"] == cls)]
        assert part.images.column("cluster").to_pylist() == rows["cluster"].tolist()
    remove_partitions(scattered, small)


def test_channel_features_of_a_run_without_them_are_refused_before_any_write(tmp_path):
    store = write_run(tmp_path / "run", {0: result_table([image("a/1.png", "a", 0, record(0, np.ones((4, 4))))])},
                      heatmap_side=4)
    with pytest.raises(ValueError, match="no channel relevance.*--features heatmap"):
        plan_partitions(store, class_index(store), "channels")
    assert not store.exists("classes")
