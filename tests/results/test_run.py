"""Opening a run for pandas users: tables read from committed shards only (a shard whose files
exist without its marker is invisible), an image's heatmap, reconstructions and critical path in
the units the analysis gave them, the layer labels, and the reducer's tables, which name
``lrpscale reduce`` while they are missing."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from lrpscale.results import Run, open_run
from lrpscale.results.reducer import reduce_run
from lrpscale.storage import tables
from lrpscale.storage.store import RunStore
from tests.helpers.runs import (
    deconvolution,
    edge,
    image,
    neuron,
    record,
    result_table,
    score,
    split,
    write_run,
)

HEATMAPS = {"cat/1.png": [[1e-3, -2e-3], [0.0, 4e-3]], "dog/2.png": [[0.0, 1.0], [2.0, 0.0]],
            "eel/3.png": [[5.0, 5.0], [5.0, -5.0]], "ghost/4.png": [[1.0, 0.0], [0.0, 0.0]],
            "fox/5.png": [[0.0, 0.0], [0.0, 3.0]]}
CAT_DECONV = {("conv", 4): [[[3.0]], [[-6.0]], [[1.5]]], ("fc", 7): [[[0.25]], [[0.0]], [[-1.0]]]}


def analysed(image_id: str, label: str, label_index: int, pred: int, shard: int) -> dict:
    """An analysed image: its path conv 4 -> fc 7 -> output (pred), and conv 9 selected off the path."""
    analysis = record(pred, HEATMAPS[image_id],
                      neurons=[neuron("conv", 4, relevance=0.5), neuron("conv", 9, relevance=0.1, rank=1),
                               neuron("fc", 7, relevance=0.4)],
                      edges=[edge(("conv", 4), ("fc", 7), 0.3), edge(("fc", 7), ("output", pred), 0.4)],
                      scores=[score("conv", 1, 30.0, False), score("conv", 4, 8.0, True)],
                      deconv=[deconvolution(layer, index, picture) for (layer, index), picture in CAT_DECONV.items()])
    return image(image_id, label, label_index, analysis, shard=shard)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Shard 0: cat (right), dog (wrong) and a failed input; shard 1: eel; shard 2 written, but
    its marker never was (a crash between the two): a ghost image and a ghost error."""
    shard0 = result_table([analysed("cat/1.png", "cat", 1, pred=1, shard=0), analysed("dog/2.png", "dog", 0, pred=1, shard=0),
                           image("dog/bad.png", "dog", 0, error=("decode", "OSError", "truncated"))])
    shard1 = result_table([analysed("eel/3.png", "eel", 2, pred=2, shard=1)])
    store = write_run(tmp_path / "run", {0: shard0, 1: shard1}, info={"layers": {"features.0": "conv1_1"}})
    shard2 = result_table([analysed("ghost/4.png", "cat", 1, pred=1, shard=2),
                           image("ghost/bad.png", "cat", 1, shard=2, error=("read", "OSError", "gone"))])
    for name, table in split(shard2).items():
        store.write_parquet(f"{name}/part-00002.parquet", table)
    return tmp_path / "run"


# --- opening ------------------------------------------------------------------------------------


def test_open_run_of_a_folder_without_run_json_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an lrpscale run"):
        open_run(tmp_path)


def test_a_local_run_has_its_folder_as_a_path(run_dir):
    run = open_run(run_dir)
    assert isinstance(run, Run)
    assert run.path == run_dir


def test_a_run_opens_from_a_store(run_dir):
    run = Run(RunStore(run_dir))
    assert run.info["run_id"] == "run-1"


def test_layer_labels_come_from_run_json(run_dir):
    assert open_run(run_dir).layer_labels == {"features.0": "conv1_1"}


def test_layer_labels_of_a_run_json_without_layers_are_empty(tmp_path):
    write_run(tmp_path / "run", {})
    assert open_run(tmp_path / "run").layer_labels == {}


# --- tables: committed shards only ----------------------------------------------------------------


def test_images_hold_the_analysed_images_of_committed_shards(run_dir):
    assert sorted(open_run(run_dir).images.image_id) == ["cat/1.png", "dog/2.png", "eel/3.png"]


@pytest.mark.parametrize("table", ["neurons", "scores", "edges", "deconv"])
def test_a_shard_without_its_marker_is_invisible_in_every_table(run_dir, table):
    frame = getattr(open_run(run_dir), table)
    assert set(frame.image_id) == {"cat/1.png", "dog/2.png", "eel/3.png"}


def test_errors_hold_the_failed_inputs_of_committed_shards(run_dir):
    errors = open_run(run_dir).errors
    assert errors[["image_id", "stage", "error_type", "message"]].values.tolist() == [
        ["dog/bad.png", "decode", "OSError", "truncated"]]


def test_tables_read_only_the_committed_files(run_dir):
    run = open_run(run_dir)
    assert [Path(path).name[:10] for path in run.files("images")] == ["part-00000", "part-00001"]
    assert (run_dir / "images" / "part-00002.parquet").is_file()  # written, never committed


def test_each_analysed_image_has_its_rows_once(run_dir):
    run = open_run(run_dir)
    assert run.neurons.groupby("image_id").size().to_dict() == {"cat/1.png": 3, "dog/2.png": 3, "eel/3.png": 3}
    assert run.edges.groupby("image_id").size().to_dict() == {"cat/1.png": 2, "dog/2.png": 2, "eel/3.png": 2}


def test_a_run_opened_again_sees_a_shard_committed_since(run_dir):
    RunStore(run_dir).commit(3, split(result_table([analysed("fox/5.png", "fox", 3, pred=3, shard=3)])), rows=1)
    assert "fox/5.png" in set(open_run(run_dir).images.image_id)


def test_a_run_without_committed_shards_has_empty_tables_with_their_columns(tmp_path):
    write_run(tmp_path / "run", {})
    run = open_run(tmp_path / "run")
    assert len(run.images) == 0 and "heatmap_scale" in run.images.columns
    assert len(run.neurons) == 0 and run.neurons.columns.tolist() == tables.NEURONS.names
    assert len(run.errors) == 0 and run.errors.columns.tolist() == tables.ERRORS.names


def test_arrow_reads_only_the_asked_columns_and_rows(run_dir):
    table = open_run(run_dir).arrow("neurons", ["image_id", "neuron"], ds.field("layer") == "fc")
    assert table.column_names == ["image_id", "neuron"]
    assert sorted(table.to_pylist(), key=lambda row: row["image_id"]) == [
        {"image_id": "cat/1.png", "neuron": 7}, {"image_id": "dog/2.png", "neuron": 7}, {"image_id": "eel/3.png", "neuron": 7}]


def test_table_gives_pandas_with_the_filter_applied(run_dir):
    frame = open_run(run_dir).table("images", ["image_id", "pred"], ds.field("label") == "dog")
    assert frame.values.tolist() == [["dog/2.png", 1]]


# --- heatmaps and reconstructions -----------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["cat/1.png", "dog/2.png", "eel/3.png"])
def test_heatmap_is_the_analysis_heatmap_in_relevance_units(run_dir, image_id):
    """Stored as float16 of the picture over its largest |value|: back within float16's precision."""
    heatmap = open_run(run_dir).heatmap(image_id)
    assert heatmap.shape == (2, 2) and heatmap.dtype == np.float32
    expected = np.array(HEATMAPS[image_id])
    assert np.allclose(heatmap, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_heatmap_of_an_image_not_analysed_raises_key_error(run_dir):
    run = open_run(run_dir)
    for image_id in ("nobody.png", "dog/bad.png", "ghost/4.png"):  # unknown, failed, uncommitted
        with pytest.raises(KeyError):
            run.heatmap(image_id)


def test_heatmaps_stack_every_image_heatmap_in_table_order(run_dir):
    run = open_run(run_dir)
    stacked = run.heatmaps()
    assert stacked.shape == (3, 2, 2)
    expected = np.array([HEATMAPS[image_id] for image_id in run.images.image_id])
    assert np.allclose(stacked, expected, rtol=1e-3, atol=1e-5)


def test_heatmaps_of_a_selection_stack_only_its_images(run_dir):
    run = open_run(run_dir)
    stacked = run.heatmaps(run.images[run.images.label == "eel"])
    assert stacked.shape == (1, 2, 2)
    assert np.allclose(stacked[0], HEATMAPS["eel/3.png"], rtol=1e-3)


def test_heatmaps_of_no_images_is_an_empty_stack(run_dir):
    run = open_run(run_dir)
    assert len(run.heatmaps(run.images.iloc[:0])) == 0


@pytest.mark.parametrize("layer, index", list(CAT_DECONV))
def test_reconstruction_is_the_analysis_picture_in_its_units(run_dir, layer, index):
    picture = open_run(run_dir).reconstruction("cat/1.png", layer, index)
    assert picture.shape == (3, 1, 1) and picture.dtype == np.float32
    assert np.allclose(picture, CAT_DECONV[(layer, index)], rtol=1e-3)


def test_reconstruction_of_a_neuron_not_reconstructed_raises_key_error(run_dir):
    run = open_run(run_dir)
    with pytest.raises(KeyError, match="conv:9"):
        run.reconstruction("cat/1.png", "conv", 9)
    with pytest.raises(KeyError):
        run.reconstruction("ghost/4.png", "conv", 4)


# --- an image's critical path ---------------------------------------------------------------------


def test_image_graph_is_the_critical_path_of_the_image(run_dir):
    graph = open_run(run_dir).image_graph("eel/3.png")
    assert set(graph.nodes) == {("conv", 4), ("fc", 7), ("output", 2)}  # conv 9 was selected but is not on the path
    assert set(graph.edges) == {(("conv", 4), ("fc", 7)), (("fc", 7), ("output", 2))}
    assert graph.edges[("conv", 4), ("fc", 7)]["relevance"] == pytest.approx(0.3)
    assert graph.nodes[("conv", 4)]["relevance"] == pytest.approx(0.5)


def test_image_graph_of_an_unknown_image_is_empty(run_dir):
    assert open_run(run_dir).image_graph("ghost/4.png").number_of_nodes() == 0


# --- the reducer's tables -------------------------------------------------------------------------


def test_a_run_is_reduced_once_the_reducer_has_written_its_tables(run_dir):
    assert not open_run(run_dir).is_reduced
    reduce_run(run_dir)
    assert open_run(run_dir).is_reduced


@pytest.mark.parametrize("read", [
    lambda run: run.class_nodes, lambda run: run.class_edges, lambda run: run.class_heatmaps, lambda run: run.k_curves,
    lambda run: run.chosen_scores, lambda run: run.worst_explained(), lambda run: run.class_heatmap("cat"),
    lambda run: run.class_graph("cat"),
], ids=["class_nodes", "class_edges", "class_heatmaps", "k_curves", "chosen_scores", "worst_explained", "class_heatmap",
        "class_graph"])
def test_the_reducers_tables_of_an_unreduced_run_raise_naming_lrpscale_reduce(run_dir, read):
    with pytest.raises(FileNotFoundError, match=re.escape(f"lrpscale reduce {run_dir}")):
        read(open_run(run_dir))


def test_class_heatmap_is_the_mean_of_its_images_heatmaps_each_over_its_sum(run_dir):
    reduce_run(run_dir)
    dog = np.array(HEATMAPS["dog/2.png"])
    assert np.allclose(open_run(run_dir).class_heatmap("dog"), dog / np.abs(dog).sum(), rtol=1e-3)
    assert np.allclose(open_run(run_dir).class_heatmap("1", by="pred"), np.mean(
        [np.array(HEATMAPS[i]) / np.abs(HEATMAPS[i]).sum() for i in ("cat/1.png", "dog/2.png")], axis=0), rtol=1e-3)


def test_class_heatmap_of_an_unknown_class_raises_key_error(run_dir):
    reduce_run(run_dir)
    with pytest.raises(KeyError, match="ghost"):
        open_run(run_dir).class_heatmap("ghost")
