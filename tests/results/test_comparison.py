"""Comparing two runs: per class (accuracy, summary-heatmap drift, critical-path overlap, chosen k
and SMAPE) and per image (prediction change, heatmap drift), against numbers worked out by hand
on tiny runs and against numpy on the heatmaps of two synthetic runs of one dataset."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lrpscale.results import Run, open_run
from lrpscale.results.comparison import Comparison, compare_runs, percent
from lrpscale.run.synthetic import generate_run
from lrpscale.storage.store import RunStore
from tests.helpers.runs import edge, image, neuron, record, result_table, score, synthetic_listing, write_run, write_synthetic_run

HALF = math.sqrt(0.5)  # the cosine of [1, 0, 0, 0] and [1, 1, 0, 0]


def analysed(image_id: str, label: str, label_index: int, pred: int, heatmap, conv: tuple[int, ...], fc: int, k: int,
             smape: float) -> dict:
    """An analysed image whose critical path runs from its ``conv`` neurons to fc neuron ``fc`` to the
    output ``pred``, with its fidelity SMAPE ``smape`` at its chosen ``k`` (the other scores rows, an
    unchosen k and the forward-backward variant, must not count)."""
    analysis = record(pred, heatmap, neurons=[neuron("conv", n) for n in conv] + [neuron("fc", fc)],
                      edges=[edge(("conv", n), ("fc", fc)) for n in conv] + [edge(("fc", fc), ("output", pred))],
                      scores=[score("conv", k, smape, True), score("conv", 2 * k, 99.0, False),
                              score("conv", k, 77.0, True, variant="forward_backward")])
    return image(image_id, label, label_index, analysis)


BEFORE = [analysed("cat/1.png", "cat", 0, 0, [[1, 0], [0, 0]], (0, 1), 5, k=4, smape=10.0),
          analysed("dog/2.png", "dog", 1, 1, [[0, 1], [0, 0]], (3,), 6, k=1, smape=20.0),
          analysed("dog/4.png", "dog", 1, 1, [[0, 0], [1, 0]], (3,), 6, k=1, smape=30.0)]
# cat/1 is now predicted as a dog, its heatmap drifted and its path moved from conv 1 to conv 2;
# dog/2 is unchanged; dog/4 keeps its prediction and path, its heatmap drifted; eel/3 is new
AFTER = [analysed("cat/1.png", "cat", 0, 1, [[1, 1], [0, 0]], (0, 2), 5, k=16, smape=4.0),
         BEFORE[1],
         analysed("dog/4.png", "dog", 1, 1, [[0, 0], [1, 1]], (3,), 6, k=1, smape=30.0),
         analysed("eel/3.png", "eel", 2, 2, [[0, 0], [0, 1]], (8,), 9, k=1, smape=5.0)]


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> Comparison:
    """The comparison of BEFORE (one shard) with AFTER (two shards)."""
    root = tmp_path_factory.mktemp("hand")
    write_run(root / "before", {0: result_table(BEFORE)}, info={"run_id": "before", "model_id": "m:1"})
    write_run(root / "after", {0: result_table(AFTER[:2]), 1: result_table(AFTER[2:])},
              info={"run_id": "after", "model_id": "m:2"})
    return compare_runs(root / "before", root / "after")


# --- per class, by hand -------------------------------------------------------------------------


def classes_row(comparison: Comparison, cls: str) -> dict:
    row, = comparison.classes[comparison.classes["class"] == cls].to_dict("records")
    return row


def test_classes_are_every_class_of_either_run_in_class_order(hand):
    assert hand.classes["class"].tolist() == ["cat", "dog", "eel"]


def test_class_images_and_accuracy_per_run(hand):
    assert [(row["images_a"], row["images_b"]) for row in hand.classes.to_dict("records")] == [(1, 1), (2, 2), (0, 1)]
    cat = classes_row(hand, "cat")
    assert (cat["accuracy_a"], cat["accuracy_b"], cat["accuracy_change"]) == (1.0, 0.0, -1.0)
    assert classes_row(hand, "dog")["accuracy_change"] == 0.0


def test_class_heatmap_cosine_and_mse_of_the_summary_heatmaps(hand):
    """cat: [1, 0, 0, 0] -> [.5, .5, 0, 0]; dog: mean [0, .5, .5, 0] -> [0, .5, .25, .25]."""
    cat, dog = classes_row(hand, "cat"), classes_row(hand, "dog")
    assert cat["heatmap_cosine"] == pytest.approx(HALF, rel=1e-6)
    assert cat["heatmap_mse"] == pytest.approx(0.125, rel=1e-6)
    assert dog["heatmap_cosine"] == pytest.approx(math.sqrt(0.75), rel=1e-6)
    assert dog["heatmap_mse"] == pytest.approx(0.03125, rel=1e-6)


def test_class_critical_path_overlap_is_the_jaccard_of_neurons_and_of_edges(hand):
    """cat's neurons {conv 0, conv 1, fc 5} -> {conv 0, conv 2, fc 5}: 2 of 4; its edges share only
    conv 0 -> fc 5 of five (the output edge moved from class 0 to class 1). dog's path is unchanged."""
    cat, dog = classes_row(hand, "cat"), classes_row(hand, "dog")
    assert (cat["node_jaccard"], cat["edge_jaccard"]) == (0.5, 0.2)
    assert (dog["node_jaccard"], dog["edge_jaccard"]) == (1.0, 1.0)


def test_classes_say_in_which_runs_they_are(hand):
    assert hand.classes["present"].tolist() == ["both", "both", "B only"]


def test_a_class_in_one_run_only_has_no_drift_and_no_overlap(hand):
    """NaN, not 0: a class that is missing from a run did not change."""
    eel = classes_row(hand, "eel")
    assert np.isnan(eel["heatmap_cosine"]) and np.isnan(eel["heatmap_mse"])
    assert np.isnan(eel["node_jaccard"]) and np.isnan(eel["edge_jaccard"])
    assert np.isnan(eel["accuracy_a"]) and np.isnan(eel["accuracy_change"])
    assert np.isnan(eel["k_a"]) and eel["k_b"] == 1.0


def test_class_chosen_k_and_smape_count_the_fidelity_rows_at_the_chosen_k_only(hand):
    cat, dog = classes_row(hand, "cat"), classes_row(hand, "dog")
    assert (cat["k_a"], cat["k_b"], cat["k_change"]) == (4.0, 16.0, 12.0)
    assert (cat["smape_a"], cat["smape_b"], cat["smape_change"]) == pytest.approx((10.0, 4.0, -6.0))
    assert (dog["k_a"], dog["smape_a"], dog["smape_change"]) == pytest.approx((1.0, 25.0, 0.0))


# --- per image, by hand ---------------------------------------------------------------------------


def test_images_are_those_in_both_runs_prediction_changes_first_then_largest_drift(hand):
    assert hand.images["image_id"].tolist() == ["cat/1.png", "dog/4.png", "dog/2.png"]
    assert hand.images["prediction_changed"].tolist() == [True, False, False]
    assert hand.images[["pred_a", "pred_b"]].values.tolist() == [[0, 1], [1, 1], [1, 1]]


def test_image_heatmap_cosine_and_mse_of_each_heatmap_over_its_sum(hand):
    images = hand.images.set_index("image_id")
    assert images["heatmap_cosine"].tolist() == pytest.approx([HALF, HALF, 1.0], rel=1e-6)
    assert images["heatmap_mse"].tolist() == pytest.approx([0.125, 0.125, 0.0], abs=1e-9)
    assert images["change"].tolist() == pytest.approx([1 - HALF, 1 - HALF, 0.0], abs=1e-6)


def test_image_smape_at_the_chosen_k_per_run(hand):
    images = hand.images.set_index("image_id")
    assert images.loc["cat/1.png", ["smape_a", "smape_b"]].tolist() == pytest.approx([10.0, 4.0])


# --- the summary, by hand -------------------------------------------------------------------------


def test_summary_headline_numbers(hand):
    s = hand.summary
    assert (s["run_a"], s["run_b"], s["model_a"], s["model_b"]) == ("before", "after", "m:1", "m:2")
    assert (s["images_a"], s["images_b"], s["images_common"]) == (3, 4, 3)
    assert (s["classes"], s["classes_common"], s["classes_only_a"], s["classes_only_b"]) == (3, 2, 0, 1)
    assert (s["accuracy_a"], s["accuracy_b"]) == (1.0, 0.75)
    assert s["prediction_changed"] == 1
    assert s["mean_heatmap_cosine"] == pytest.approx((2 * HALF + 1) / 3, rel=1e-6)


def test_summary_overlap_means_are_over_the_classes_in_both_runs(hand):
    """cat and dog; eel, in the second run only, is left out."""
    assert hand.summary["mean_node_jaccard"] == pytest.approx((0.5 + 1) / 2)
    assert hand.summary["mean_edge_jaccard"] == pytest.approx((0.2 + 1) / 2)


def test_summary_of_two_complete_runs_warns_only_of_the_classes_in_one_run(hand):
    assert (hand.summary["complete_a"], hand.summary["complete_b"]) == (True, True)
    warning, = hand.summary["warnings"]
    assert "0 classes only in A, 1 only in B" in warning


def test_an_incomplete_run_is_named_in_a_warning(tmp_path):
    write_run(tmp_path / "done", {0: result_table(BEFORE)})
    write_run(tmp_path / "running", {0: result_table(BEFORE)}, info={"run_id": "half", "status": "running", "shards": 2})
    summary = compare_runs(tmp_path / "done", tmp_path / "running").summary
    assert (summary["complete_a"], summary["complete_b"]) == (True, False)
    warning, = summary["warnings"]
    assert "half" in warning and "incomplete" in warning and "1 of 2 shards" in warning


def test_runs_of_different_architectures_get_no_overlap(tmp_path):
    """vgg11's neuron 5 is not vgg16's neuron 5."""
    write_run(tmp_path / "vgg16", {0: result_table(BEFORE)})
    write_run(tmp_path / "vgg11", {0: result_table(BEFORE)}, info={"config": {"model": "vgg11"}})
    comparison = compare_runs(tmp_path / "vgg16", tmp_path / "vgg11")
    assert comparison.classes.node_jaccard.isna().all() and comparison.classes.edge_jaccard.isna().all()
    assert np.allclose(comparison.classes.heatmap_cosine, 1.0)
    assert any("different architectures" in warning for warning in comparison.summary["warnings"])


def test_accuracy_counts_only_images_with_a_known_label(tmp_path):
    runs = [write_run(tmp_path / name, {0: result_table(BEFORE + [
        analysed("unlabelled/9.png", None, None, 0, [[1, 0], [0, 0]], (0,), 5, k=1, smape=1.0)])}) for name in "ab"]
    summary = compare_runs(Run(runs[0]), Run(runs[1])).summary
    assert (summary["accuracy_a"], summary["images_a"]) == (1.0, 4)


def test_comparing_reduces_a_run_that_is_not_reduced(tmp_path):
    paths = [tmp_path / "before", tmp_path / "after"]
    write_run(paths[0], {0: result_table(BEFORE)})
    write_run(paths[1], {0: result_table(AFTER)})
    assert not any(open_run(path).is_reduced for path in paths)
    compare_runs(*paths)
    assert all(open_run(path).is_reduced for path in paths)


def test_runs_with_heatmaps_of_different_sizes_are_refused(tmp_path):
    write_run(tmp_path / "small", {0: result_table(BEFORE)})
    wide = [analysed("cat/1.png", "cat", 0, 0, np.eye(3), (0,), 5, k=1, smape=1.0)]
    write_run(tmp_path / "wide", {0: result_table(wide)}, heatmap_side=3)
    with pytest.raises(ValueError, match="heatmap-size"):
        compare_runs(tmp_path / "small", tmp_path / "wide")


def test_runs_on_another_filesystem_compare_as_local_ones():
    """pyarrow's in-memory mock filesystem stands in for object storage."""
    before = write_run(RunStore("mock:///before"), {0: result_table(BEFORE)})
    after = write_run(RunStore("mock:///after"), {0: result_table(AFTER)})
    comparison = compare_runs(Run(before), Run(after))
    assert comparison.summary["images_common"] == 3 and comparison.summary["prediction_changed"] == 1


# --- two synthetic runs of one dataset, against numpy -----------------------------------------------


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    """Two synthetic runs of the same 96 images (3 classes, 3 shards) with different seeds."""
    root = tmp_path_factory.mktemp("pair")
    listing, wnids = synthetic_listing(96, 3, shard_size=32)
    paths = [root / "a", root / "b"]
    for path, seed in zip(paths, (0, 1)):
        write_synthetic_run(path, listing, wnids, seed)
    return paths, compare_runs(*paths)


def unit_heatmaps(run_dir) -> pd.DataFrame:
    """image_id, label, pred and the heatmap over its sum of |values| (flat), read with pandas."""
    images = pd.read_parquet(run_dir / "images", columns=["image_id", "label", "pred", "heatmap"])
    maps = np.stack([np.asarray(h, np.float64) for h in images.heatmap])
    return images.assign(unit=list(maps / np.abs(maps).sum(1, keepdims=True)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_synthetic_image_heatmap_cosines_equal_numpy(synthetic_pair):
    (a, b), comparison = synthetic_pair
    both = unit_heatmaps(a).merge(unit_heatmaps(b), on="image_id", suffixes=("_a", "_b"))
    expected = {i: (cosine(x, y), float(((x - y) ** 2).mean())) for i, x, y in zip(both.image_id, both.unit_a, both.unit_b)}
    images = comparison.images
    assert sorted(images.image_id) == sorted(expected) and len(expected) == 96
    for image_id, cos, mse in zip(images.image_id, images.heatmap_cosine, images.heatmap_mse):
        assert cos == pytest.approx(expected[image_id][0], rel=1e-5)
        assert mse == pytest.approx(expected[image_id][1], rel=1e-4)
    assert (images.heatmap_cosine < 0.99).all()  # different seeds: every heatmap drifted


def test_synthetic_class_heatmap_cosines_equal_numpy(synthetic_pair):
    """A class's summary heatmap is the mean of its images' heatmaps, each over its sum of |values|."""
    (a, b), comparison = synthetic_pair
    means = [{label: np.mean(np.stack(part.unit), 0) for label, part in unit_heatmaps(path).groupby("label")} for path in (a, b)]
    classes = comparison.classes.set_index("class")
    assert sorted(classes.index) == sorted(means[0]) and len(classes) == 3
    for label in classes.index:
        assert classes.loc[label, "heatmap_cosine"] == pytest.approx(cosine(means[0][label], means[1][label]), rel=1e-5)


def test_synthetic_prediction_changes_and_accuracy_equal_pandas(synthetic_pair):
    (a, b), comparison = synthetic_pair
    images = [pd.read_parquet(path / "images", columns=["image_id", "label", "label_index", "pred"]) for path in (a, b)]
    both = images[0].merge(images[1], on="image_id", suffixes=("_a", "_b"))
    assert comparison.summary["prediction_changed"] == int((both.pred_a != both.pred_b).sum()) > 0
    changed = set(both.image_id[both.pred_a != both.pred_b])
    assert set(comparison.images.image_id[comparison.images.prediction_changed]) == changed
    for key, frame in zip("ab", images):
        correct = (frame.label_index == frame.pred).groupby(frame.label).mean()
        assert comparison.classes.set_index("class")[f"accuracy_{key}"].to_dict() == pytest.approx(correct.to_dict())
        assert comparison.summary[f"accuracy_{key}"] == pytest.approx((frame.label_index == frame.pred).mean())


# --- a run compared with itself, runs of different datasets ----------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two synthetic runs by ``generate_run``: seeds 0 and 1 draw different classes and images."""
    root = tmp_path_factory.mktemp("generated")
    for seed in (0, 1):
        generate_run(root / f"seed-{seed}", images=48, classes=3, shard_size=16, seed=seed, processes=1)
    return root / "seed-0", root / "seed-1"


def test_a_run_compared_with_itself_has_not_changed(generated):
    comparison = compare_runs(generated[0], generated[0])
    assert comparison.summary["images_common"] == comparison.summary["images_a"] == 48
    assert comparison.summary["prediction_changed"] == 0
    assert np.allclose(comparison.images.heatmap_cosine, 1.0) and np.allclose(comparison.images.heatmap_mse, 0.0)
    classes = comparison.classes
    assert len(classes) == 3
    assert np.allclose(classes.heatmap_cosine, 1.0)
    assert (classes.node_jaccard == 1.0).all() and (classes.edge_jaccard == 1.0).all()
    assert (classes[["accuracy_change", "k_change", "smape_change"]] == 0).all().all()
    assert comparison.summary["mean_node_jaccard"] == comparison.summary["mean_edge_jaccard"] == 1.0


def test_runs_that_share_no_class_are_refused(generated):
    """Seeds 0 and 1 of ``generate_run`` draw different ImageNet classes: nothing to compare."""
    with pytest.raises(ValueError, match="share no class"):
        compare_runs(*generated)


def test_runs_of_one_class_but_different_images_have_no_image_rows(tmp_path):
    write_run(tmp_path / "a", {0: result_table(BEFORE)})
    write_run(tmp_path / "b", {0: result_table([analysed("cat/9.png", "cat", 0, 0, [[1, 0], [0, 0]], (0,), 5, 1, 1.0)])})
    comparison = compare_runs(tmp_path / "a", tmp_path / "b")
    assert len(comparison.images) == 0 and comparison.summary["images_common"] == 0
    assert comparison.summary["prediction_changed"] == 0 and np.isnan(comparison.summary["mean_heatmap_cosine"])
    assert comparison.classes["class"].tolist() == ["cat", "dog"]


# --- writing and showing --------------------------------------------------------------------------


def test_write_stores_the_tables_the_summary_and_its_text(hand, tmp_path):
    out = hand.write(tmp_path / "compare-before")
    assert sorted(p.name for p in out.iterdir()) == ["classes.parquet", "images.parquet", "summary.json", "summary.md"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "classes.parquet"), hand.classes, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "images.parquet"), hand.images, check_dtype=False)
    assert json.loads((out / "summary.json").read_text()) == hand.summary
    assert (out / "summary.md").read_text() == hand.text()


def test_write_summary_of_runs_without_common_images_holds_nan(tmp_path):
    """The mean heatmap cosine of no images is NaN, which Python's json writes and reads back."""
    write_run(tmp_path / "a", {0: result_table(BEFORE[:1])})
    write_run(tmp_path / "b", {0: result_table([analysed("cat/9.png", "cat", 0, 0, [[1, 0], [0, 0]], (0,), 5, 1, 1.0)])})
    out = compare_runs(tmp_path / "a", tmp_path / "b").write(tmp_path / "out")
    assert math.isnan(json.loads((out / "summary.json").read_text())["mean_heatmap_cosine"])


def test_text_names_the_runs_and_the_headline_numbers(hand):
    text = hand.text()
    assert "run before (m:1" in text and "run after (m:2" in text
    assert "accuracy: 100.0% -> 75.0%" in text
    assert "predictions changed: 1 of 3" in text


@pytest.mark.parametrize("value, shown", [(0.5, "50.0%"), (1, "100.0%"), (0.12345, "12.3%"), (0.0, "0.0%"),
                                          (None, "n/a"), (float("nan"), "n/a"), (np.float64("nan"), "n/a")])
def test_percent_shows_a_fraction_for_people(value, shown):
    assert percent(value) == shown
