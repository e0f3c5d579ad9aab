"""The reducer's dense per-class accumulators against pandas on the same rows: class rows, target
counts, neuron selection counts and sums, and critical-path edge counts among each class's
members; and the rankings (most frequent first, ties broken as the class graphs break them)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lrpscale.results.class_counts import BY, ClassIndex, EdgeCounts, NeuronCounts, TargetCounts, class_order

LABELS = ["cat", "dog", "eel"]


def dense(values: pd.Series, names: np.ndarray, width: int) -> np.ndarray:
    """A Series indexed by (class name, id) as a (classes, width) array, rows in ``names`` order."""
    out = np.zeros((len(names), width))
    row_of = {name: i for i, name in enumerate(names)}
    for (cls, key), value in values.items():
        out[row_of[cls], key] = value
    return out


def neurons_chunk(rng: np.random.Generator, rows: int, widths: dict[str, int], labels=LABELS, preds: int = 4) -> pa.Table:
    """Random rows of the neurons table; some labels are missing (unlabelled images)."""
    layer = rng.choice(list(widths), rows)
    label = pa.array([None if r < 0.1 else labels[i] for r, i in zip(rng.random(rows), rng.integers(0, len(labels), rows))],
                     pa.string())
    return pa.table({
        "label": label, "pred": pa.array(rng.integers(0, preds, rows), pa.int32()), "layer": layer,
        "neuron": pa.array([rng.integers(0, widths[name]) for name in layer], pa.int32()),
        "relevance": pa.array(rng.normal(0, 1, rows), pa.float32()),
        "activation": pa.array(rng.lognormal(0, 1, rows), pa.float32())})


# --- class_order ------------------------------------------------------------------------------


def test_class_order_sorts_numbers_by_value_then_names():
    assert sorted(["b", "10", "2", "a", "1", "n01440764"], key=class_order) == ["1", "2", "10", "a", "b", "n01440764"]


# --- ClassIndex -------------------------------------------------------------------------------


def test_class_index_gives_new_classes_rows_in_order_of_first_appearance():
    index = ClassIndex()
    assert index.lookup(pa.array(["dog", "cat", "dog", "eel"]), "label", add=True).tolist() == [0, 1, 0, 2]
    assert index.names("label").tolist() == ["dog", "cat", "eel"]
    assert index.size("label") == 3


def test_class_index_keeps_a_class_row_across_lookups():
    index = ClassIndex()
    index.lookup(pa.array(["dog", "cat"]), "label", add=True)
    assert index.lookup(pa.array(["cat", "eel", "dog"]), "label", add=True).tolist() == [1, 2, 0]


def test_class_index_without_add_gives_unknown_classes_minus_one():
    index = ClassIndex()
    index.lookup(pa.array(["dog"]), "label", add=True)
    assert index.lookup(pa.array(["cat", "dog"]), "label").tolist() == [-1, 0]
    assert index.size("label") == 1


def test_class_index_gives_nulls_minus_one_and_no_row():
    index = ClassIndex()
    assert index.lookup(pa.array([None, "dog", None]), "label", add=True).tolist() == [-1, 0, -1]
    assert index.names("label").tolist() == ["dog"]


def test_class_index_names_predictions_by_their_index():
    index = ClassIndex()
    assert index.lookup(pa.array([7, 3, 7], pa.int32()), "pred", add=True).tolist() == [0, 1, 0]
    assert index.names("pred").tolist() == ["7", "3"]


def test_class_index_keeps_the_groupings_apart():
    index = ClassIndex()
    index.lookup(pa.array(["dog"]), "label", add=True)
    index.lookup(pa.array([1, 2], pa.int32()), "pred", add=True)
    assert (index.size("label"), index.size("pred")) == (1, 2)
    assert index.lookup(pa.array(["1"]), "label").tolist() == [-1]


def test_class_index_reads_chunked_and_dictionary_encoded_columns_alike():
    """The reducer reads string columns dictionary-encoded, in chunks."""
    index = ClassIndex()
    index.lookup(pa.array(["dog", "cat"]), "label", add=True)
    chunked = pa.chunked_array([pa.array(["cat", None]), pa.array(["dog", "cat"])])
    encoded = pa.array(["cat", None, "dog", "cat"]).dictionary_encode()
    assert index.lookup(chunked, "label").tolist() == index.lookup(encoded, "label").tolist() == [1, -1, 0, 1]


def test_class_index_of_an_empty_column_is_empty():
    assert ClassIndex().lookup(pa.array([], pa.string()), "label", add=True).tolist() == []


# --- TargetCounts -----------------------------------------------------------------------------


def images_chunk(label, pred, target) -> pa.Table:
    return pa.table({"label": pa.array(label, pa.string()), "pred": pa.array(pred, pa.int32()),
                     "target": pa.array(target, pa.int32())})


def test_target_counts_equal_pandas_over_chunks_that_add_classes_and_outputs():
    rng = np.random.default_rng(0)
    chunks = [images_chunk(rng.choice(LABELS[:2], 50).tolist(), rng.integers(0, 3, 50), rng.integers(0, 3, 50)),
              images_chunk(rng.choice(LABELS, 50).tolist(), rng.integers(0, 5, 50), rng.integers(0, 6, 50))]
    index = ClassIndex()
    counts = TargetCounts(index)
    for chunk in chunks:
        counts.add(chunk)
    frame = pd.concat([chunk.to_pandas() for chunk in chunks], ignore_index=True)
    for by in BY:
        names = index.names(by)
        expected = dense(frame.assign(cls=frame[by].astype(str)).groupby(["cls", "target"]).size(), names, 6)
        assert counts.counts[by].shape == (len(names), 6)
        assert (counts.counts[by] == expected).all(), by


def test_target_counts_skip_images_without_a_target_or_a_class():
    index = ClassIndex()
    counts = TargetCounts(index)
    counts.add(images_chunk(["cat", "cat", None], [0, 1, 1], [1, None, 1]))
    assert index.names("label").tolist() == ["cat"]
    assert counts.counts["label"].tolist() == [[0, 1]]
    assert index.names("pred").tolist() == ["0", "1"]
    assert counts.counts["pred"].tolist() == [[0, 1], [0, 1]]


def test_target_counts_top_is_each_class_most_frequent_targets_ties_to_the_lower():
    index = ClassIndex()
    counts = TargetCounts(index)
    counts.add(images_chunk(["cat"] * 6 + ["dog"], [0] * 7, [4, 4, 2, 1, 1, 3, 0]))
    # cat: target 4 twice, 1 twice (the lower first), then 2 and 3 once each; dog: target 0 once
    assert counts.top("label", 3).tolist() == [[1, 4, 2], [0, -1, -1]]


def test_target_counts_top_of_a_grouping_never_counted_is_padding():
    index = ClassIndex()
    index.lookup(pa.array(["cat", "dog"]), "label", add=True)
    assert TargetCounts(index).top("label", 2).tolist() == [[-1, -1], [-1, -1]]


# --- NeuronCounts -----------------------------------------------------------------------------


@pytest.fixture
def neuron_rows():
    """Two chunks of random neurons rows: the second adds a class, a prediction and wider layers."""
    rng = np.random.default_rng(1)
    return [neurons_chunk(rng, 300, {"conv": 5, "fc": 8}, labels=LABELS[:2], preds=3),
            neurons_chunk(rng, 300, {"conv": 7, "fc": 12, "late": 3})]


def folded(chunks) -> NeuronCounts:
    counts = NeuronCounts(ClassIndex())
    for chunk in chunks:
        counts.add(chunk)
    return counts


@pytest.mark.parametrize("by", BY)
def test_neuron_counts_equal_pandas_groupby(neuron_rows, by):
    counts = folded(neuron_rows)
    frame = pd.concat([chunk.to_pandas() for chunk in neuron_rows], ignore_index=True).dropna(subset=[by])
    frame = frame.assign(cls=frame[by].astype(str), relevance=frame.relevance.astype(np.float64),
                         activation=frame.activation.astype(np.float64))
    names = counts.index.names(by)
    for layer, part in frame.groupby("layer"):
        width = int(part.neuron.max()) + 1
        count, relevance, activation = counts.arrays[(by, layer)]
        assert counts.width(by, layer) == width
        grouped = part.groupby(["cls", "neuron"])
        assert (count == dense(grouped.size(), names, width)).all(), layer
        assert np.allclose(relevance, dense(grouped.relevance.sum(), names, width), rtol=1e-12), layer
        assert np.allclose(activation, dense(grouped.activation.sum(), names, width), rtol=1e-12), layer


def test_neuron_counts_skip_rows_without_a_class():
    counts = folded([pa.table({"label": pa.array([None, "cat"], pa.string()), "pred": pa.array([0, 0], pa.int32()),
                               "layer": ["conv", "conv"], "neuron": pa.array([1, 2], pa.int32()),
                               "relevance": [1.0, 2.0], "activation": [1.0, 1.0]})])
    assert counts.arrays[("label", "conv")][0].tolist() == [[0, 0, 1]]
    assert counts.arrays[("pred", "conv")][0].tolist() == [[0, 1, 1]]


def test_neuron_counts_width_of_a_layer_never_seen_is_zero():
    assert NeuronCounts(ClassIndex()).width("label", "conv") == 0


def ranked_rows() -> pa.Table:
    """cat at conv: neuron 3 three times; 1 and 4 twice each, 4 with the higher mean relevance;
    0 and 2 once each with equal relevance. dog at conv: neuron 0 once."""
    rows = [("cat", 3, 1.0)] * 3 + [("cat", 1, 1.0), ("cat", 1, 1.0), ("cat", 4, 5.0), ("cat", 4, 1.0),
                                    ("cat", 2, 0.5), ("cat", 0, 0.5), ("dog", 0, 9.0)]
    return pa.table({"label": [r[0] for r in rows], "pred": pa.array([0] * len(rows), pa.int32()),
                     "layer": ["conv"] * len(rows), "neuron": pa.array([r[1] for r in rows], pa.int32()),
                     "relevance": [r[2] for r in rows], "activation": [1.0] * len(rows)})


def test_neuron_counts_top_ranks_by_count_then_mean_relevance_then_lower_neuron():
    top = folded([ranked_rows()]).top(4)
    assert top[("label", "conv")].tolist() == [[3, 4, 1, 0], [0, -1, -1, -1]]


def test_neuron_counts_top_pads_classes_with_fewer_neurons():
    top = folded([ranked_rows()]).top(7)
    assert top[("label", "conv")].tolist() == [[3, 4, 1, 0, 2, -1, -1], [0, -1, -1, -1, -1, -1, -1]]


def test_neuron_counts_selected_names_every_selected_class_and_neuron(neuron_rows):
    counts = folded(neuron_rows)
    frame = pd.concat([chunk.to_pandas() for chunk in neuron_rows], ignore_index=True)
    for by, layer, (rows, ids) in counts.selected():
        mine = frame[(frame.layer == layer) & frame[by].notna()]
        expected = set(zip(mine[by].astype(str), mine.neuron))
        assert set(zip(counts.index.names(by)[rows], ids.tolist())) == expected, (by, layer)
    assert {(by, layer) for by, layer, _ in counts.selected()} == {(by, layer) for by in BY for layer in ("conv", "fc", "late")}


def test_neuron_counts_frame_gives_frequency_and_means_per_class_image():
    counts = folded([ranked_rows()])
    names = counts.index.names("label").tolist()
    images_of = pd.DataFrame({"by": ["label", "label"], "class": ["cat", "dog"], "class_images": [4, 1]})
    frame = counts.frame("label", "conv", np.array([names.index("cat"), names.index("dog")]), np.array([4, 0]), images_of)
    assert frame[["class", "neuron", "count", "class_images"]].values.tolist() == [["cat", 4, 2, 4], ["dog", 0, 1, 1]]
    assert frame["frequency"].tolist() == [0.5, 1.0]
    assert frame["mean_relevance"].tolist() == [3.0, 9.0]
    assert frame["mean_activation"].tolist() == [1.0, 1.0]


def test_neuron_counts_strongest_gives_the_rows_of_each_class_top_neurons():
    counts = folded([ranked_rows()])
    images_of = pd.DataFrame({"by": ["label", "label", "pred"], "class": ["cat", "dog", "0"], "class_images": [4, 1, 5]})
    strongest = counts.strongest(counts.top(2), images_of)
    label = strongest[strongest.by == "label"]
    assert label[["class", "neuron", "count"]].values.tolist() == [["cat", 3, 3], ["cat", 4, 2], ["dog", 0, 1]]
    # by prediction cat and dog are one class "0": dog's neuron 0 (relevance 9) lifts neuron 0 above 4
    pred = strongest[strongest.by == "pred"]
    assert pred[["class", "neuron", "count"]].values.tolist() == [["0", 3, 3], ["0", 0, 2]]


def test_neuron_counts_strongest_of_nothing_is_an_empty_nodes_frame():
    strongest = NeuronCounts(ClassIndex()).strongest({}, pd.DataFrame(columns=["by", "class", "class_images"]))
    assert len(strongest) == 0
    assert {"by", "class", "layer", "neuron", "count", "frequency", "mean_relevance"} <= set(strongest.columns)


# --- EdgeCounts -------------------------------------------------------------------------------


def edges_chunk(rows: list[tuple]) -> pa.Table:
    """rows: (label, lower layer, lower neuron, upper layer, upper neuron, relevance)."""
    return pa.table({"label": pa.array([r[0] for r in rows], pa.string()),
                     "pred": pa.array([0] * len(rows), pa.int32()),
                     "layer_from": [r[1] for r in rows], "neuron_from": pa.array([r[2] for r in rows], pa.int32()),
                     "layer_to": [r[3] for r in rows], "neuron_to": pa.array([r[4] for r in rows], pa.int32()),
                     "relevance": [float(r[5]) for r in rows]})


@pytest.fixture
def edge_counts() -> EdgeCounts:
    """cat (row 0): conv members {0, 2}, fc {5}, target 0; dog (row 1): conv {1}, fc {5, 6}, target 1.
    Only the label grouping has members."""
    index = ClassIndex()
    index.lookup(pa.array(["cat", "dog"]), "label", add=True)
    members = {("label", "conv"): np.array([[0, 2], [1, -1]]), ("label", "fc"): np.array([[5, -1], [5, 6]])}
    targets = {"label": np.array([[0, -1], [1, -1]])}
    return EdgeCounts(index, members, targets, {("label", "conv"): 3, ("label", "fc"): 7})


def test_edge_counts_count_only_edges_between_a_class_members(edge_counts):
    edge_counts.add(edges_chunk([
        ("cat", "conv", 0, "fc", 5, 1.0), ("cat", "conv", 0, "fc", 5, 3.0),  # counted twice
        ("cat", "conv", 1, "fc", 5, 1.0),        # conv 1 is dog's member, not cat's
        ("cat", "fc", 5, "output", 0, 0.5),      # to cat's target
        ("cat", "fc", 5, "output", 1, 0.5),      # target 1 is not among cat's
        ("dog", "conv", 1, "fc", 6, 2.0),
        ("dog", "conv", 0, "fc", 5, 2.0),        # conv 0 is not dog's
    ]))
    assert sorted(edge_counts.stats().values.tolist()) == [
        ["label", "cat", "conv", 0, "fc", 5, 2, 4.0],
        ["label", "cat", "fc", 5, "output", 0, 1, 0.5],
        ["label", "dog", "conv", 1, "fc", 6, 1, 2.0]]


def test_edge_counts_skip_unknown_classes_and_rows_without_a_class(edge_counts):
    edge_counts.add(edges_chunk([("bird", "conv", 0, "fc", 5, 1.0), (None, "conv", 0, "fc", 5, 1.0)]))
    assert len(edge_counts.stats()) == 0


def test_edge_counts_skip_neurons_outside_the_layer_width(edge_counts):
    """fc is 7 wide: neuron 9 is no member's, and must not index past the slots."""
    edge_counts.add(edges_chunk([("dog", "conv", 1, "fc", 9, 1.0), ("dog", "conv", 1, "fc", 6, 1.0)]))
    assert edge_counts.stats()[["class", "neuron_to", "count"]].values.tolist() == [["dog", 6, 1]]


def test_edge_counts_skip_a_class_first_seen_after_the_members_were_ranked(edge_counts):
    edge_counts.index.lookup(pa.array(["eel"]), "label", add=True)
    edge_counts.add(edges_chunk([("eel", "conv", 0, "fc", 5, 1.0), ("cat", "conv", 2, "fc", 5, 1.0)]))
    assert edge_counts.stats()["class"].tolist() == ["cat"]


def test_edge_counts_accumulate_over_chunks(edge_counts):
    edge_counts.add(edges_chunk([("cat", "conv", 2, "fc", 5, 1.5)]))
    edge_counts.add(edges_chunk([("cat", "conv", 2, "fc", 5, 2.5), ("dog", "conv", 1, "fc", 5, 1.0)]))
    assert edge_counts.stats()[["class", "neuron_from", "count", "sum_relevance"]].values.tolist() == [
        ["cat", 2, 2, 4.0], ["dog", 1, 1, 1.0]]


def test_edge_counts_of_no_edges_is_an_empty_frame_with_the_columns(edge_counts):
    assert edge_counts.stats().columns.tolist() == ["by", "class", "layer_from", "neuron_from", "layer_to", "neuron_to",
                                                    "count", "sum_relevance"]


def test_edge_counts_equal_pandas_over_random_edges_among_ranked_members(neuron_rows):
    """Members from ``NeuronCounts.top`` and ``TargetCounts.top``, as the reducer ranks them; the
    expected counts are pandas over every edge whose ends are both members of its class."""
    rng = np.random.default_rng(2)
    neurons = folded(neuron_rows)
    targets = TargetCounts(neurons.index)
    targets.add(images_chunk(rng.choice(LABELS, 60).tolist(), rng.integers(0, 4, 60), rng.integers(0, 4, 60)))
    per_class = 3
    top = {key: ids[:, :per_class] for key, ids in neurons.top(per_class).items()}
    tops = {by: targets.top(by, per_class) for by in BY}
    counts = EdgeCounts(neurons.index, top, tops, {key: neurons.width(*key) for key in neurons.arrays})
    layers, widths = ["conv", "fc", "late", "output"], {"conv": 7, "fc": 12, "late": 3, "output": 4}
    pairs = rng.integers(0, 3, 3000)
    chunk = pa.table({
        "label": pa.array(rng.choice(LABELS, 3000).tolist(), pa.string()),
        "pred": pa.array(rng.integers(0, 4, 3000), pa.int32()),
        "layer_from": [layers[p] for p in pairs], "neuron_from": pa.array([rng.integers(0, widths[layers[p]]) for p in pairs],
                                                                          pa.int32()),
        "layer_to": [layers[p + 1] for p in pairs], "neuron_to": pa.array([rng.integers(0, widths[layers[p + 1]])
                                                                           for p in pairs], pa.int32()),
        "relevance": rng.normal(0, 1, 3000)})
    counts.add(chunk)
    frame = chunk.to_pandas()
    expected = []
    for by in BY:
        names = neurons.index.names(by)
        ranked = {layer: ids for (b, layer), ids in top.items() if b == by} | {"output": tops[by]}
        members = {(names[row], layer, int(ids[row, slot]))
                   for layer, ids in ranked.items() for row, slot in zip(*np.nonzero(ids >= 0))}
        rows = frame.assign(cls=frame[by].astype(str))
        inside = [(c, lf, nf) in members and (c, lt, nt) in members for c, lf, nf, lt, nt in zip(
            rows.cls, rows.layer_from, rows.neuron_from, rows.layer_to, rows.neuron_to)]
        grouped = rows[inside].groupby(["cls", "layer_from", "neuron_from", "layer_to", "neuron_to"]).relevance
        expected.append(grouped.agg(count="size", sum_relevance="sum").reset_index().rename(columns={"cls": "class"})
                        .assign(by=by))
    keys = ["by", "class", "layer_from", "neuron_from", "layer_to", "neuron_to"]
    expected = pd.concat(expected).sort_values(keys, ignore_index=True)
    stats = counts.stats().sort_values(keys, ignore_index=True)
    assert len(stats) == len(expected) > 20
    pd.testing.assert_frame_equal(stats[[*keys, "count"]], expected[[*keys, "count"]], check_dtype=False)
    assert np.allclose(stats.sum_relevance, expected.sum_relevance, rtol=1e-12)
