"""SpRAy over a run without Ray (lrpscale.results.strategies): hand-made runs written through the real
writer, whose classes come in planted shapes, give the clusters, tables, ranks and distinguishing
neurons worked out by hand; the channel relevance column as the writer stores it."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from threadpoolctl import threadpool_limits

from lrpscale.results import open_run
from lrpscale.results.class_partitions import bucket_files, plan_partitions, remove_partitions, write_partition
from lrpscale.results.strategies import (
    ClassStrategyTables,
    StrategySettings,
    analyse_strategy_class,
    class_index,
    compute_strategies,
    distinguishing_neurons,
    strategy_tables,
    write_strategies,
)
from lrpscale.storage import tables
from tests.helpers.runs import image, neuron, record, result_table, write_run

SIDE = 8  # heatmap side of the hand-made runs


def one_class(store, grouping: str, cls: str, settings: StrategySettings | None = None) -> ClassStrategyTables:
    """One class's strategies the way a run computes them: the rows regrouped by class, then the class's task."""
    settings = settings or StrategySettings()
    plan = plan_partitions(store, class_index(store), settings.features)
    try:
        files = bucket_files([write_partition(store, plan, part) for part in range(len(plan.parts))])
        return analyse_strategy_class(store, files[plan.buckets[grouping, cls]], grouping, cls, settings)
    finally:
        remove_partitions(store, plan)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One BLAS/OpenMP thread, as in test_spray: t-SNE on a shared 2-core machine is far slower
    with more, and one thread makes layouts repeatable."""
    with threadpool_limits(limits=1):
        yield


def corner_map(rng: np.random.Generator, corner: int) -> np.ndarray:
    """An (8, 8) heatmap with its relevance in the top-left (0) or bottom-right (1) corner, weak noise elsewhere."""
    heatmap = rng.normal(0.0, 0.02, (SIDE, SIDE))
    rows, columns = (slice(0, 3), slice(0, 3)) if corner == 0 else (slice(5, 8), slice(5, 8))
    heatmap[rows, columns] += rng.uniform(0.5, 1.5, (3, 3))
    return heatmap


def two_shape_images(label: str, label_index: int, count: int, seed: int = 0, wrong: int = 0, prefix: str = "") -> list[dict]:
    """``count`` images of one class, alternately in shape 0 and 1 (image i in shape i % 2); the
    images of shape s select neuron conv:(1 + s), all select conv:0; the last ``wrong`` are
    predicted as class 9."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        shape = i % 2
        pred = 9 if i >= count - wrong else label_index
        analysis = record(pred, corner_map(rng, shape), neurons=[neuron("conv", 0), neuron("conv", 1 + shape, rank=1)],
                          channel_relevance=rng.normal(0.0, 1.0, 6))
        rows.append(image(f"{prefix}{label}/{i:03d}.png", label, label_index, analysis))
    return rows


def shape_of(image_id: str) -> int:
    return int(image_id.rsplit("/", 1)[1][:3]) % 2


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory):
    """Class "a" (24 images in two heatmap shapes, 4 of them predicted 9) over two shards."""
    rows = two_shape_images("a", 0, 24, wrong=4)
    return write_run(tmp_path_factory.mktemp("two-shapes") / "run",
                     {0: result_table(rows[:12]), 1: result_table(rows[12:])}, heatmap_side=SIDE)


def test_a_class_in_two_heatmap_shapes_splits_into_two_pure_clusters(two_shapes):
    part = one_class(two_shapes, "label", "a")
    frame = part.images.to_pandas()
    assert part.summary["clusters"] == 2 and part.summary["images"] == 24
    purity = pd.crosstab(frame["cluster"], frame["image_id"].map(shape_of))
    assert sorted(purity.to_numpy().ravel().tolist()) == [0, 0, 12, 12]  # each cluster holds one shape only
    assert part.summary["connectivity"] == pytest.approx(0.0, abs=1e-9)  # two separate groups
    assert frame["sampled"].all() and np.isfinite(frame[["x", "y"]]).all().all()
    assert frame["image_id"].tolist() == sorted(frame["image_id"])


def test_cluster_rows_by_hand(two_shapes):
    part = one_class(two_shapes, "label", "a")
    images = part.images.to_pandas()
    clusters = part.clusters.to_pandas()
    maps = open_run(two_shapes.location).images.set_index("image_id")
    for row in clusters.itertuples():
        ids = images.loc[images["cluster"] == row.cluster, "image_id"]
        assert row.images == len(ids) == 12 and row.share == pytest.approx(0.5)
        wrong = sum(int(i.rsplit("/", 1)[1][:3]) >= 20 for i in ids)  # the last 4 images are predicted 9
        assert row.accuracy == pytest.approx(1 - wrong / 12)
        stored = np.stack([tables.square_picture(maps.loc[i, "heatmap"]) for i in ids]).astype(np.float64)
        expected = (stored / np.abs(stored).sum((1, 2), keepdims=True)).mean(0)
        assert np.allclose(tables.square_picture(row.prototype), expected, atol=1e-6)
        # conv:1 (shape 0) and conv:2 (shape 1) differ by 1, ties go by neuron; conv:0 (all images) does not differ
        own = 1 + shape_of(ids.iloc[0])
        assert row.distinguishing_neurons.tolist() == [
            {"layer": "conv", "neuron": n, "frequency_inside": float(n == own), "frequency_outside": float(n != own)}
            for n in (1, 2)]


def test_distinguishing_neurons_of_a_tiny_class_by_hand():
    """Five images, clusters [0, 0, 0, 1, 1]. conv:7 is selected by images 0, 1 and 3: inside
    cluster 0 2/3, outside 1/2 (difference 1/6); fc:2 by images 3 and 4: 0 inside, 1 outside;
    conv:5 by all (no difference, left out); conv:3 by image 0 only: 1/3 inside, 0 outside."""
    labels = np.array([0, 0, 0, 1, 1])
    ids = ["i0", "i1", "i2", "i3", "i4"]
    selected = [("i0", "conv", 7), ("i1", "conv", 7), ("i3", "conv", 7), ("i3", "fc", 2), ("i4", "fc", 2),
                ("i0", "conv", 3)] + [(i, "conv", 5) for i in ids]
    neurons = pd.DataFrame(selected, columns=["image_id", "layer", "neuron"])
    found = distinguishing_neurons(labels, ids, neurons, top=3)
    assert found[0] == [{"layer": "fc", "neuron": 2, "frequency_inside": 0.0, "frequency_outside": 1.0},
                        {"layer": "conv", "neuron": 3, "frequency_inside": pytest.approx(1 / 3), "frequency_outside": 0.0},
                        {"layer": "conv", "neuron": 7, "frequency_inside": pytest.approx(2 / 3),
                         "frequency_outside": pytest.approx(1 / 2)}]
    assert found[1] == [{"layer": "fc", "neuron": 2, "frequency_inside": 1.0, "frequency_outside": 0.0},
                        {"layer": "conv", "neuron": 3, "frequency_inside": 0.0, "frequency_outside": pytest.approx(1 / 3)},
                        {"layer": "conv", "neuron": 7, "frequency_inside": pytest.approx(1 / 2),
                         "frequency_outside": pytest.approx(2 / 3)}]
    assert distinguishing_neurons(np.zeros(5, np.int64), ids, neurons) == {}  # one cluster: no rest to differ from


def test_features_channels_cluster_by_the_channel_relevance(tmp_path):
    """Heatmaps all alike, channel relevances in two shapes: only the channel features split the class."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(24):
        channels = rng.normal(0.0, 0.02, 6)
        channels[slice(0, 3) if i % 2 == 0 else slice(3, 6)] += 1.0
        rows.append(image(f"a/{i:03d}.png", "a", 0, record(0, corner_map(rng, 0), channel_relevance=channels)))
    store = write_run(tmp_path / "run", {0: result_table(rows)}, heatmap_side=SIDE)
    channels = one_class(store, "label", "a", StrategySettings(features="channels")).images.to_pandas()
    purity = pd.crosstab(channels["cluster"], channels["image_id"].map(shape_of))
    assert sorted(purity.to_numpy().ravel().tolist()) == [0, 0, 12, 12]
    assert one_class(store, "label", "a", StrategySettings(features="channels")).summary["features"] == "channels"


def test_channel_features_of_a_run_without_them_name_the_way_out(two_shapes, tmp_path):
    rows = [image(f"a/{i}.png", "a", 0, record(0, corner_map(np.random.default_rng(i), 0))) for i in range(4)]
    store = write_run(tmp_path / "run", {0: result_table(rows)}, heatmap_side=SIDE)
    with pytest.raises(ValueError, match="stores no channel relevance.*--features heatmap"):
        one_class(store, "label", "a", StrategySettings(features="channels"))


def test_the_images_table_stores_the_channel_relevance_as_a_float16_tensor(two_shapes, tmp_path):
    images = open_run(two_shapes.location).arrow("images")
    field = images.schema.field("channel_relevance")
    assert field.type == tables.picture_type([6])
    values = images.column("channel_relevance").combine_chunks().to_numpy_ndarray()
    assert values.dtype == np.float16 and values.shape == (24, 6)
    expected = np.random.default_rng(0)
    first = [expected.normal(0.0, 0.02, (SIDE, SIDE)), expected.uniform(0.5, 1.5, (3, 3)), expected.normal(0.0, 1.0, 6)]
    assert values[0].tolist() == first[2].astype(np.float16).tolist()
    # a shard whose records carry none has no such column; the row builder stores None then
    bare = write_run(tmp_path / "bare", {0: result_table([image("x/1.png", "x", 0, record(0, np.ones((SIDE, SIDE))))])},
                     heatmap_side=SIDE)
    assert "channel_relevance" not in open_run(bare.location).arrow("images").schema.names
    assert tables.result_row(record(0, np.ones((2, 2))), "0")["channel_relevance"] is None


def test_a_mixed_shard_keeps_rows_without_channel_relevance_null():
    rows = [image("a/1.png", "a", 0, record(0, np.ones((2, 2)), channel_relevance=[0.5, -0.5])),
            image("a/2.png", "a", 0, record(0, np.ones((2, 2))))]
    column = tables.split_result(result_table(rows), 2, 1, "all", "m", "r")["images"].column("channel_relevance")
    assert column.type == tables.picture_type([2]) and column.to_pylist() == [[0.5, -0.5], None]


@pytest.fixture(scope="module")
def several_classes(tmp_path_factory):
    """Class "a" in two shapes (24 images), class "b" of 24 images in one shape with noise, class
    "c" of one image, two unlabelled images, one error row; three shards, "a" in the first only."""
    rng = np.random.default_rng(7)
    a = two_shape_images("a", 0, 24)
    b = [image(f"b/{i:03d}.png", "b", 1, record(1, corner_map(rng, 0), neurons=[neuron("conv", 4)])) for i in range(24)]
    c = [image("c/000.png", "c", 2, record(2, corner_map(rng, 1)))]
    unlabelled = [image(f"u/{i}.png", None, None, record(1, corner_map(rng, 1))) for i in range(2)]
    failed = [image("b/bad.png", "b", 1, error=("decode", "OSError", "broken"))]
    return write_run(tmp_path_factory.mktemp("several") / "run",
                     {0: result_table(a), 1: result_table(b[:12] + failed), 2: result_table(b[12:] + c + unlabelled)},
                     heatmap_side=SIDE)


@pytest.fixture(scope="module")
def several_tables(several_classes):
    return compute_strategies(several_classes)


def test_class_index_lists_each_class_with_the_shards_it_lies_in(several_classes):
    index = class_index(several_classes).set_index(["grouping", "class"])
    assert index.loc[("label", "a"), "images"] == 24 and len(index.loc[("label", "a"), "shards"]) == 1
    assert len(index.loc[("label", "b"), "shards"]) == 2
    assert index.loc[("pred", "1"), "images"] == 26  # b's 24 and the two unlabelled images
    assert sorted(index.index.get_level_values("grouping")) == ["label"] * 3 + ["pred"] * 3


def test_every_analysed_image_appears_once_per_grouping(several_classes, several_tables):
    strategies = several_tables["strategies"].to_pandas()
    analysed = open_run(several_classes.location).images
    for grouping in ("label", "pred"):
        mine = strategies[strategies["grouping"] == grouping]
        expected = analysed[analysed[grouping].notna()]
        assert sorted(mine["image_id"]) == sorted(expected["image_id"])
        assert not mine["image_id"].duplicated().any()
        assert (mine["class"] == mine["image_id"].map(expected.set_index("image_id")[grouping].astype(str))).all()
    clusters = several_tables["strategy_clusters"].to_pandas()
    classes = several_tables["strategy_classes"].to_pandas()
    sizes = clusters.groupby(["grouping", "class"])["images"].sum()
    assert sizes.to_dict() == classes.set_index(["grouping", "class"])["images"].to_dict()


def test_classes_rank_by_connectivity_ascending_per_grouping(several_tables):
    classes = several_tables["strategy_classes"].to_pandas()
    label = classes[classes["grouping"] == "label"].set_index("class")
    # a: two separate groups (connectivity ~0); b: one shape (no gap); c: one image (no lambda_2, last)
    assert label.loc["a", "connectivity"] == pytest.approx(0.0, abs=1e-9)
    assert label.loc["b", "connectivity"] > 0.05 and np.isnan(label.loc["c", "connectivity"])
    assert label.sort_values("rank").index.tolist() == ["a", "b", "c"]
    for _, group in classes.groupby("grouping"):
        assert sorted(group["rank"]) == list(range(1, len(group) + 1))
        ordered = group.sort_values("rank")["connectivity"].dropna().tolist()
        assert ordered == sorted(ordered)
    assert label.loc["a", "clusters"] == 2 and label.loc["c", "clusters"] == 1
    assert label.loc["c", "eigenvalues"].tolist() == [pytest.approx(1.0)]


def test_the_cap_clusters_a_sample_and_says_so(two_shapes):
    part = one_class(two_shapes, "label", "a", StrategySettings(cap=14, seed=1))
    frame = part.images.to_pandas()
    assert frame["sampled"].sum() == 14 == part.summary["sampled_images"] and part.summary["cap"] == 14
    assert frame.loc[~frame["sampled"], ["x", "y"]].isna().all().all()
    assert frame.loc[frame["sampled"], ["x", "y"]].notna().all().all()
    # the images outside the sample join the cluster of their own shape
    purity = pd.crosstab(frame["cluster"], frame["image_id"].map(shape_of))
    assert sorted(purity.to_numpy().ravel().tolist()) == [0, 0, 12, 12]


def test_written_tables_read_back_through_the_run(several_classes, several_tables):
    settings = StrategySettings()
    write_strategies(several_classes, several_tables, settings, 1.5)
    run = open_run(several_classes.location)
    assert run.has_strategies
    assert len(run.strategies) == several_tables["strategies"].num_rows
    assert run.strategy_classes["rank"].tolist() == several_tables["strategy_classes"].column("rank").to_pylist()
    prototype = run.strategy_clusters["prototype"].iloc[0]
    assert tables.square_picture(prototype).shape == (SIDE, SIDE)
    written = json.loads(several_classes.read_bytes("classes/strategies.json"))
    assert written["settings"] == settings.to_dict() and written["classes"] == {"label": 3, "pred": 3}
    # the eigengap rule suggests at least two clusters once a class has more than k + 1 images: a and b
    assert written["images"] == {"label": 49, "pred": 51} and written["several_strategies"]["label"] == 2


def test_a_run_without_strategies_says_which_command_writes_them(two_shapes):
    run = open_run(two_shapes.location)
    assert not run.has_strategies
    with pytest.raises(FileNotFoundError, match="lrpscale strategies"):
        run.strategy_classes  # noqa: B018 (reading the property is the test)


def test_a_run_without_analysed_images_is_refused(tmp_path):
    store = write_run(tmp_path / "run", {0: result_table([image("x.png", "x", 0, error=("read", "OSError", "gone"))])})
    with pytest.raises(ValueError, match="no analysed images"):
        compute_strategies(store)


@pytest.mark.parametrize("settings, message", [({"features": "pixels"}, "features"), ({"k": 0}, "k must"),
                                               ({"cap": 0}, "cap must"), ({"top_neurons": -1}, "top_neurons")])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        StrategySettings(**settings)


def test_strategy_tables_of_no_classes_refuse():
    with pytest.raises(ValueError, match="no classes"):
        strategy_tables([])


def test_schema_of_the_cluster_table(two_shapes):
    clusters = one_class(two_shapes, "label", "a").clusters
    assert clusters.schema.field("prototype").type == tables.picture_type([SIDE, SIDE], pa.float32())
    assert clusters.schema.field("distinguishing_neurons").type.value_type.names == [
        "layer", "neuron", "frequency_inside", "frequency_outside"]
