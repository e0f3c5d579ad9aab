"""The table schemas and their builders: pictures stored as float16 scaled to max |value| 1, the one
row builder (an analysis record -> the analysis fields of a RESULT row), fixed-shape tensor
columns, and the split of a shard's RESULT rows into the flat tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lrpscale.storage import tables
from tests.helpers.runs import (
    DECONV_MODE,
    DECONV_SIDE,
    HEATMAP_SIDE,
    MODEL_ID,
    curve,
    deconvolution,
    edge,
    image,
    neuron,
    record,
    result_table,
    score,
    split,
)

# the fields of a RESULT row that the input gives (the actor's base row), not the analysis
INPUT_FIELDS = {"image_id", "uri", "label", "label_index", "shard", "node_id", "error_stage", "error_type",
                "error_message"}


def cat_record() -> dict:
    return record(pred=3, target=1, heatmap=[[1e-8, -2e-8], [5e-9, 0.0]],
                  neurons=[neuron("conv", 4, relevance=0.5, activation=2.0, rank=0), neuron("fc", 7, rank=1)],
                  edges=[edge(("conv", 4), ("fc", 7), 0.25), edge(("fc", 7), ("output", 1), 0.75)],
                  scores=[score("conv", 1, 40.0, False), score("conv", 4, 5.0, True)],
                  deconv=[deconvolution("conv", 4, [[[3.0]], [[-6.0]], [[1.5]]])])


# --- scaled_float16 ---------------------------------------------------------------------------


def test_scaled_float16_divides_by_the_largest_magnitude():
    stored, scale = tables.scaled_float16(np.array([[1e-8, -2e-8], [5e-9, 0.0]]))
    assert scale == pytest.approx(2e-8)
    assert stored.dtype == np.float16
    assert stored.tolist() == [0.5, -1.0, 0.25, 0.0]


def test_scaled_float16_keeps_values_below_float16_range():
    """1e-9 is far below float16's smallest subnormal (6e-8): stored unscaled it would be 0."""
    picture = np.array([1e-9, 3e-9, -7e-10], np.float32)
    assert not np.float16(1e-9)
    stored, scale = tables.scaled_float16(picture)
    assert np.allclose(stored.astype(np.float64) * scale, picture, rtol=1e-3, atol=0)


def test_scaled_float16_flattens_the_picture():
    stored, _ = tables.scaled_float16(np.ones((3, 2, 2)))
    assert stored.shape == (12,)


@pytest.mark.parametrize("picture", [np.zeros((2, 2)), np.array([1.0, np.nan]), np.array([np.inf, 1.0])],
                         ids=["zeros", "nan", "inf"])
def test_scaled_float16_stores_zeros_with_scale_zero_when_there_is_no_finite_scale(picture):
    stored, scale = tables.scaled_float16(picture)
    assert scale == 0.0
    assert stored.tolist() == [0.0] * picture.size


# --- result_row -------------------------------------------------------------------------------


def test_result_row_gives_exactly_the_analysis_fields_of_a_result_row():
    row = tables.result_row(cat_record(), "three")
    assert set(row) == set(tables.RESULT.names) - INPUT_FIELDS


def test_result_row_copies_the_numbers_and_names_the_prediction():
    analysis = cat_record()
    row = tables.result_row(analysis, "three")
    for key in ("pred", "target", "logit", "prob", "rel_total", "rel_pos", "rel_neg", "conservation_error"):
        assert row[key] == analysis[key], key
    assert row["pred_label"] == "three"


def test_result_row_keeps_the_neuron_score_and_edge_lists():
    analysis = cat_record()
    row = tables.result_row(analysis, "three")
    assert row["neurons"] == analysis["neurons"]
    assert row["scores"] == analysis["scores"]
    assert row["edges"] == analysis["edges"]


def test_result_row_stores_the_heatmap_scaled_with_its_scale():
    row = tables.result_row(cat_record(), "three")
    assert row["heatmap_scale"] == pytest.approx(2e-8)
    assert row["heatmap"].dtype == np.float16
    assert row["heatmap"].tolist() == [0.5, -1.0, 0.25, 0.0]


def test_result_row_scales_each_reconstruction_by_its_own_largest_value():
    analysis = cat_record()
    analysis["deconv"].append(deconvolution("fc", 7, [[[0.0]], [[0.5]], [[0.25]]]))
    first, second = tables.result_row(analysis, "three")["deconv"]
    assert (first["layer"], first["neuron"], first["scale"]) == ("conv", 4, 6.0)
    assert first["reconstruction"].tolist() == [0.5, -1.0, 0.25]
    assert (second["layer"], second["neuron"], second["scale"]) == ("fc", 7, 0.5)
    assert second["reconstruction"].tolist() == [0.0, 1.0, 0.5]


def test_result_row_leaves_out_what_the_tables_do_not_store():
    """``layer_totals`` is in the record (for the conservation check) but in no table."""
    row = tables.result_row(cat_record(), "three")
    assert "layer_totals" not in row


def test_result_row_with_the_input_fields_is_a_valid_result_row():
    row = image("cat/1.png", "cat", 1, cat_record())
    table = result_table([row])
    assert table.schema == tables.RESULT
    back = table.to_pylist()[0]
    assert back["neurons"][0] == {"layer": "conv", "neuron": 4, "rank": 0, "relevance": 0.5, "activation": 2.0}
    assert back["edges"][1]["layer_to"] == "output" and back["edges"][1]["neuron_to"] == 1
    assert back["scores"][1]["chosen"] is True


# --- tensor_column ----------------------------------------------------------------------------


def test_tensor_column_reshapes_each_value_to_the_given_shape():
    column = tables.tensor_column([np.arange(4), np.arange(4, 8).reshape(2, 2)], [2, 2])
    assert column.type == tables.picture_type([2, 2])
    assert column.to_numpy_ndarray().tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_tensor_column_keeps_the_value_type():
    column = tables.tensor_column([np.array([0.1, 0.2])], [2], pa.float32())
    assert column.type.value_type == pa.float32()
    assert column.to_numpy_ndarray().dtype == np.float32
    assert column.to_numpy_ndarray()[0].tolist() == pytest.approx([0.1, 0.2])


def test_tensor_column_of_no_values_is_empty():
    column = tables.tensor_column([], [3, 2, 2])
    assert len(column) == 0 and column.type.shape == [3, 2, 2]


def test_tensor_column_refuses_values_of_the_wrong_size():
    with pytest.raises(pa.ArrowInvalid):
        tables.tensor_column([np.arange(3)], [2, 2])


# --- split_result -----------------------------------------------------------------------------


@pytest.fixture
def shard() -> pa.Table:
    """Three inputs: an analysed cat, an analysed dog without neurons or deconvolutions whose
    region perturbation curves were measured, and an input that failed to decode."""
    cat = cat_record()
    dog = record(pred=0, heatmap=[[0.0, 2.0], [-4.0, 1.0]], scores=[score("conv", 1, 9.0, True)],
                 faithfulness=curve("morf", [3.0, 1.0, 0.5]) + curve("random", [3.0, 2.5, 2.0]))
    return result_table([image("cat/1.png", "cat", 1, cat), image("dog/2.png", "dog", 0, dog),
                         image("dog/bad.png", "dog", 0, error=("decode", "UnidentifiedImageError", "cannot identify"))])


def test_split_result_makes_every_table_with_its_schema(shard):
    split_tables = split(shard)
    assert set(split_tables) == set(tables.TABLES)
    assert split_tables["images"].schema == tables.images_schema(HEATMAP_SIDE)
    assert split_tables["neurons"].schema == tables.NEURONS
    assert split_tables["scores"].schema == tables.SCORES
    assert split_tables["edges"].schema == tables.EDGES
    assert split_tables["deconv"].schema == tables.deconv_schema(DECONV_SIDE)
    assert split_tables["faithfulness"].schema == tables.FAITHFULNESS
    assert split_tables["errors"].schema == tables.ERRORS


def test_split_result_gives_one_faithfulness_row_per_curve_point_with_the_composite(shard):
    rows = split(shard)["faithfulness"].to_pandas()
    assert rows[["image_id", "label", "pred", "composite", "order", "step"]].values.tolist() == [
        ["dog/2.png", "dog", 0, "epsilon-gamma-box", order, step] for order in ("morf", "random") for step in range(3)]
    assert rows["logit"].tolist() == [3.0, 1.0, 0.5, 3.0, 2.5, 2.0]
    assert rows["fraction"].tolist() == [0.0, 0.25, 0.5] * 2


def test_split_result_puts_analysed_inputs_in_images_and_failed_ones_in_errors(shard):
    split_tables = split(shard)
    assert split_tables["images"].column("image_id").to_pylist() == ["cat/1.png", "dog/2.png"]
    assert split_tables["errors"].to_pylist() == [{"image_id": "dog/bad.png", "uri": "/data/dog/bad.png", "label": "dog",
                                                   "stage": "decode", "error_type": "UnidentifiedImageError",
                                                   "message": "cannot identify"}]


def test_split_result_images_carry_the_model_and_run(shard):
    images = split(shard, run_id="r-42")["images"].to_pandas()
    assert images["model_id"].tolist() == [MODEL_ID] * 2
    assert images["run_id"].tolist() == ["r-42"] * 2
    assert images["pred_label"].tolist() == ["3", "0"]


def test_split_result_heatmaps_become_tensors_of_the_heatmap_side(shard):
    images = split(shard)["images"]
    heatmaps = images.column("heatmap").combine_chunks().to_numpy_ndarray()
    assert heatmaps.shape == (2, HEATMAP_SIDE, HEATMAP_SIDE)
    scales = images.column("heatmap_scale").to_numpy()
    expected = np.array([[[1e-8, -2e-8], [5e-9, 0.0]], [[0.0, 2.0], [-4.0, 1.0]]])
    assert np.allclose(heatmaps * scales[:, None, None], expected, rtol=1e-3, atol=0)


def test_split_result_gives_one_neuron_row_per_listed_neuron_with_its_owner(shard):
    """The flat neurons table equals the records' lists exploded by hand."""
    neurons = split(shard)["neurons"].to_pandas()
    expected = pd.DataFrame([
        {"image_id": "cat/1.png", "label": "cat", "pred": 3, **item} for item in cat_record()["neurons"]])
    pd.testing.assert_frame_equal(neurons, expected[neurons.columns.tolist()], check_dtype=False)


def test_split_result_gives_one_edge_and_score_row_per_listed_item(shard):
    split_tables = split(shard)
    edges = split_tables["edges"].to_pandas()
    assert edges[["image_id", "layer_from", "neuron_from", "layer_to", "neuron_to"]].values.tolist() == [
        ["cat/1.png", "conv", 4, "fc", 7], ["cat/1.png", "fc", 7, "output", 1]]
    scores = split_tables["scores"].to_pandas()
    assert scores[["image_id", "pred", "k", "smape", "chosen"]].values.tolist() == [
        ["cat/1.png", 3, 1, 40.0, False], ["cat/1.png", 3, 4, 5.0, True], ["dog/2.png", 0, 1, 9.0, True]]


def test_split_result_deconvolutions_carry_the_mode_and_their_picture(shard):
    deconv = split(shard)["deconv"]
    row = deconv.to_pylist()[0]
    assert (deconv.num_rows, row["image_id"], row["layer"], row["neuron"], row["mode"]) == (
        1, "cat/1.png", "conv", 4, DECONV_MODE)
    picture = deconv.column("reconstruction").combine_chunks().to_numpy_ndarray()[0]
    assert picture.shape == (3, DECONV_SIDE, DECONV_SIDE)
    assert (picture.astype(np.float64) * row["scale"]).ravel().tolist() == [3.0, -6.0, 1.5]


def test_split_result_of_only_failed_inputs_gives_empty_analysis_tables():
    result = result_table([image("x.png", None, None, error=("read", "OSError", "gone"))])
    split_tables = split(result)
    assert {name: t.num_rows for name, t in split_tables.items()} == {
        "images": 0, "neurons": 0, "scores": 0, "edges": 0, "deconv": 0, "faithfulness": 0, "errors": 1}
    assert split_tables["errors"].column("label").to_pylist() == [None]
