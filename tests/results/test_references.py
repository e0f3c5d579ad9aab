"""Reference images per neuron without Ray (lrpscale.results.references, docs/method.md §18 "Reference
images"): the neurons that get references, the top images per scope against a plain sort of the
stored values (ties by image_id), and the crop rule on hand-made heatmaps, its smoothing against
torchvision's gaussian_blur (what zennit-crp smooths with)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lrpscale.results.references import (
    channel_layer,
    choose_references,
    crop_box,
    crop_pictures,
    reference_crop,
    reference_neurons,
    smooth,
)
from lrpscale.results.strategies import DISTINGUISHING
from lrpscale.storage.store import CLASSES
from tests.helpers.runs import image, neuron, record, result_table, write_run

LAYERS = {"features.21": "conv4_3", "features.28": "conv5_3"}
INFO = {"layers": LAYERS, "config": {"model": "vgg16", "analysis": {"sweep_layers": None}}}
CHANNELS = 4


def _channels(i: int) -> np.ndarray:
    """Image i's stored channel relevance (exact in float16): channel 1 takes 8 distinct values
    in steps of 1/64 with ties (images i and i + 8 share one), channel 2 is negative everywhere,
    channel 3 positive for 3 images only."""
    values = np.zeros(CHANNELS, np.float32)
    values[0] = 0.25
    values[1] = ((i * 5) % 8 + 1) / 64
    values[2] = -0.125
    values[3] = 1 / 32 if i in (4, 9, 13) else 0.0
    return values


def _pred(label_index: int, i: int) -> int:
    return 1 - label_index if i in (3, 14) else label_index  # two images predicted as the other class


def _logit(i: int) -> float:
    return 2.0 + (i % 3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """18 images in two shards, labels a (even i) and b (odd i); each selects features.21
    neuron 7 with relevance (i % 5) - 1 (negative for i % 5 == 0) and logit 2 + i % 3."""
    rows = {0: [], 1: []}
    for i in range(18):
        label, index = ("a", 0) if i % 2 == 0 else ("b", 1)
        analysis = record(_pred(index, i), [[1.0, 0.0], [0.0, 0.0]], logit=_logit(i),
                          neurons=[neuron("features.21", 7, relevance=float(i % 5) - 1.0)],
                          channel_relevance=_channels(i))
        rows[i // 9].append(image(f"{label}/{i:02d}.png", label, index, analysis, shard=i // 9))
    return write_run(tmp_path_factory.mktemp("references") / "run",
                     {shard: result_table(part) for shard, part in rows.items()}, info=INFO)


def _expected(scores: dict[str, float], count: int = 8) -> list[tuple[str, float]]:
    """The plain rule: positive scores, highest first, ties to the lower image_id."""
    return sorted(((i, s) for i, s in scores.items() if s > 0), key=lambda item: (-item[1], item[0]))[:count]


def _ids() -> dict[str, int]:
    return {f"{'a' if i % 2 == 0 else 'b'}/{i:02d}.png": i for i in range(18)}


def _neurons(rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=["layer", "neuron", "grouping", "class"])


def _picked(chosen, layer, neuron_index, scope, grouping=None, cls=None):
    mine = chosen[(chosen["layer"] == layer) & (chosen["neuron"] == neuron_index) & (chosen["scope"] == scope)]
    if scope == "class":
        mine = mine[(mine["grouping"] == grouping) & (mine["class"] == cls)]
    assert list(mine["rank"]) == list(range(len(mine)))
    return list(zip(mine["image_id"], mine["score"].astype(float)))


def test_channel_layer_is_the_first_swept_layer():
    assert channel_layer(INFO) == "features.28"  # no sweep layers configured: the last conv
    layers = {"features.0": "conv1_1", "features.2": "conv1_2", "features.5": "conv2_1", "classifier.0": "fc6"}
    assert channel_layer({"layers": layers, "config": {"analysis": {}}}) == "features.5"
    assert channel_layer({"layers": LAYERS, "config": {"analysis": {"sweep_layers": ["conv4_3", "conv5_3"]}}}) == "features.21"
    assert channel_layer({"layers": LAYERS, "config": {"analysis": {"sweep_layers": ["features.28"]}}}) == "features.28"
    assert channel_layer({}) is None


def test_the_run_scope_takes_the_highest_stored_channel_relevance_ties_by_image_id(run):
    chosen = choose_references(run, _neurons([("features.28", 1, "label", "a"), ("features.28", 3, "label", "a"),
                                              ("features.28", 2, "label", "a")]))
    ids = _ids()
    for channel in (1, 3):
        expected = _expected({image_id: float(_channels(i)[channel]) for image_id, i in ids.items()})
        assert _picked(chosen, "features.28", channel, "run") == expected
    assert len(_picked(chosen, "features.28", 1, "run")) == 8
    assert len(_picked(chosen, "features.28", 3, "run")) == 3  # only three images hold positive relevance
    assert _picked(chosen, "features.28", 2, "run") == []      # negative everywhere: no reference at all
    # ties: 8 values over 18 images, so the top 8 are pairs of equal scores in image_id order
    top = _picked(chosen, "features.28", 1, "run")
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert any(a[1] == b[1] and a[0] < b[0] for a, b in zip(top, top[1:]))
    assert set(chosen["measure"]) == {"channel_relevance"}
    assert chosen.loc[chosen["scope"] == "run", ["grouping", "class"]].isna().all().all()


def test_the_class_scope_takes_the_class_of_its_grouping(run):
    chosen = choose_references(run, _neurons([("features.28", 1, "label", "b"), ("features.28", 1, "pred", "0")]))
    ids = _ids()
    by_label = {image_id: float(_channels(i)[1]) for image_id, i in ids.items() if i % 2 == 1}
    assert _picked(chosen, "features.28", 1, "class", "label", "b") == _expected(by_label)
    by_pred = {image_id: float(_channels(i)[1]) for image_id, i in ids.items() if _pred(i % 2, i) == 0}
    assert _picked(chosen, "features.28", 1, "class", "pred", "0") == _expected(by_pred)
    assert "b/03.png" in by_pred and "a/14.png" not in by_pred  # the mispredicted ones switch classes
    assert set(chosen["scope"]) == {"run", "class"}
    assert chosen[chosen["scope"] == "class"].groupby(["grouping", "class"]).size().to_dict() == {("label", "b"): 8,
                                                                                                  ("pred", "0"): 8}


def test_other_layers_score_the_selected_relevance_over_the_target_logit(run):
    chosen = choose_references(run, _neurons([("features.21", 7, "label", "a")]))
    ids = _ids()
    scores = {image_id: (i % 5 - 1.0) / _logit(i) for image_id, i in ids.items()}
    picked = _picked(chosen, "features.21", 7, "run")
    expected = _expected(scores)
    assert [i for i, _ in picked] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in picked], [s for _, s in expected], rtol=1e-6)
    in_class = _expected({k: v for k, v in scores.items() if ids[k] % 2 == 0})
    assert [i for i, _ in _picked(chosen, "features.21", 7, "class", "label", "a")] == [i for i, _ in in_class]
    assert set(chosen["measure"]) == {"selected_relevance"}


def test_reference_neurons_are_the_distinguishing_and_the_most_frequent_swept_ones(run):
    clusters = pa.table({
        "grouping": ["label", "label", "pred"], "class": ["a", "a", "0"], "cluster": [0, 1, 0],
        "distinguishing_neurons": pa.array([[{"layer": "features.21", "neuron": 7, "frequency_inside": 1.0,
                                              "frequency_outside": 0.0}],
                                            [{"layer": "features.21", "neuron": 7, "frequency_inside": 0.0,
                                              "frequency_outside": 1.0},
                                             {"layer": "features.28", "neuron": 2, "frequency_inside": 0.5,
                                              "frequency_outside": 0.0}], []], pa.list_(DISTINGUISHING))})
    nodes = pa.table({"by": ["label"] * 4 + ["pred"], "class": ["a"] * 4 + ["1"],
                      "layer": ["features.28", "features.28", "features.28", "features.21", "features.28"],
                      "neuron": [5, 6, 9, 1, 3], "count": [2, 2, 1, 9, 1], "class_images": [9] * 5,
                      "frequency": [0.5, 0.5, 0.2, 1.0, 0.1], "mean_relevance": [1.0, 2.0, 9.0, 1.0, 1.0],
                      "mean_activation": [0.0] * 5})
    run.write_parquet(f"{CLASSES}/strategy_clusters.parquet", clusters)
    run.write_parquet(f"{CLASSES}/nodes.parquet", nodes)
    try:
        found = reference_neurons(run, class_neurons=2)
        rows = list(found.itertuples(index=False, name=None))
        # distinguishing: features.21:7 (twice, once kept) and features.28:2 in label a; the two most
        # frequent swept-layer neurons of each class: 6 before 5 (equal frequency, higher mean relevance)
        assert rows == [("features.21", 7, "label", "a"), ("features.28", 2, "label", "a"),
                        ("features.28", 3, "pred", "1"), ("features.28", 5, "label", "a"),
                        ("features.28", 6, "label", "a")]
        assert list(reference_neurons(run, class_neurons=0).itertuples(index=False, name=None)) == rows[:2]
    finally:
        for name in ("strategy_clusters.parquet", "nodes.parquet"):
            run.fs.delete_file(run.path(CLASSES, name))


# --- the crop rule -----------------------------------------------------------------------------------

def test_smoothing_is_torchvisions_gaussian_blur_at_zennit_crps_kernel():
    """At 224 px the Gaussian is zennit-crp's: gaussian_blur(kernel_size=19), sigma 3.2, reflect padding."""
    torch = pytest.importorskip("torch")
    from torchvision.transforms.functional import gaussian_blur

    heatmap = np.random.default_rng(0).normal(size=(224, 224)).astype(np.float32)
    theirs = gaussian_blur(torch.from_numpy(heatmap)[None, None], kernel_size=19, sigma=3.2)[0, 0].numpy()
    np.testing.assert_allclose(smooth(heatmap), theirs, atol=1e-5)


def test_a_blob_in_a_corner_gives_that_corners_box():
    heatmap = np.zeros((32, 32), np.float32)
    heatmap[24:28, 25:29] = 1.0  # bottom right
    top, left, bottom, right = crop_box(heatmap)
    assert 20 <= top <= 24 and 21 <= left <= 25 and 28 <= bottom <= 32 and 29 <= right <= 32
    heatmap = np.zeros((224, 224), np.float32)
    heatmap[:20, :30] = 1.0  # top left: smoothed, the box grows by less than the kernel's radius
    top, left, bottom, right = crop_box(heatmap)
    assert (top, left) == (0, 0) and 20 <= bottom <= 29 and 30 <= right <= 39


def test_the_box_is_where_the_smoothed_relevance_exceeds_the_threshold():
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[10, 10] = 1.0
    heatmap[50, 40] = 0.3
    heatmap[5, 60] = -5.0  # negative relevance never widens the box
    smoothed = smooth(heatmap)
    for threshold in (0.1, 0.5):
        rows, columns = np.nonzero(smoothed > threshold * smoothed.max())
        assert crop_box(heatmap, threshold) == (rows.min(), columns.min(), rows.max() + 1, columns.max() + 1)
    assert crop_box(heatmap, 0.5)[2] < 50 < crop_box(heatmap, 0.1)[2]  # the weaker peak joins at 10%
    colour = np.stack([heatmap, np.zeros_like(heatmap), heatmap])  # (3, H, W) is summed over colour first
    assert crop_box(colour, 0.1) == crop_box(2 * heatmap, 0.1)


def test_no_positive_relevance_keeps_the_whole_picture():
    assert crop_box(-np.ones((16, 20), np.float32)) == (0, 0, 16, 20)
    assert crop_box(np.zeros((8, 8), np.float32)) == (0, 0, 8, 8)


def test_a_crop_of_a_synthetic_image_holds_its_region_of_the_picture_and_the_heatmap():
    side = 32
    pixels = np.zeros((3, side, side), np.uint8)
    pixels[0] = np.arange(side)[:, None] * 8   # red: the row
    pixels[1] = np.arange(side)[None, :] * 8   # green: the column
    pixels[2] = 200
    heatmap = np.zeros((side, side), np.float32)
    heatmap[4:9, 20:27] = np.linspace(1e-4, 5e-4, 35, dtype=np.float32).reshape(5, 7)
    crop = reference_crop(pixels, heatmap)
    top, left, bottom, right = crop_box(heatmap)
    assert (crop["top"], crop["left"], crop["bottom"], crop["right"]) == (top, left, bottom, right)
    assert (crop["height"], crop["width"]) == (bottom - top, right - left)
    picture, values = crop_pictures(crop)
    np.testing.assert_array_equal(np.round(picture * 255).astype(np.uint8),
                                  pixels[:, top:bottom, left:right].transpose(1, 2, 0))
    np.testing.assert_allclose(values, heatmap[top:bottom, left:right], rtol=1e-3, atol=1e-3 * 5e-4)
    assert Image.open(io.BytesIO(crop["image"])).format == "PNG"


def test_a_large_crop_is_area_resized_to_crop_pixels():
    side = 224
    pixels = np.random.default_rng(1).integers(0, 256, (3, side, side), dtype=np.uint8)
    heatmap = np.full((side, side), 1.0, np.float32)  # relevance everywhere: the whole picture
    heatmap[:, :112] = 3.0
    crop = reference_crop(pixels, heatmap, crop_pixels=56)
    assert (crop["top"], crop["left"], crop["bottom"], crop["right"]) == (0, 0, side, side)
    picture, values = crop_pictures(crop)
    assert picture.shape == (56, 56, 3) and values.shape == (56, 56)
    blocks = heatmap.reshape(56, 4, 56, 4).mean((1, 3))  # 4x4 block means
    np.testing.assert_allclose(values, blocks, rtol=1e-3)
    means = pixels.reshape(3, 56, 4, 56, 4).mean((2, 4)).transpose(1, 2, 0)
    assert np.abs(picture * 255 - means).max() <= 1.0
