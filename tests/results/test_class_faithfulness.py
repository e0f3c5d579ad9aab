"""Per-image and per-class AOPC and mean perturbation curves from a run's faithfulness table
(docs/method.md §16), against values computed by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lrpscale.results import open_run
from lrpscale.results.faithfulness import class_faithfulness, image_aopc
from lrpscale.results.reducer import reduce_run
from tests.helpers.runs import curve, image, record, result_table, write_run

HEATMAP = [[1.0, 0.0], [0.0, 0.0]]


def perturbed(image_id: str, label: str, label_index: int, pred: int, morf, lerf, rand, shard: int = 0) -> dict:
    analysis = record(pred, HEATMAP, faithfulness=curve("morf", morf) + curve("lerf", lerf) + curve("random", rand))
    return image(image_id, label, label_index, analysis, shard=shard)


@pytest.fixture
def run_dir(tmp_path):
    """cat/1 (pred 1) and cat/2 (pred 0) in shard 0, dog/3 (pred 0) in shard 1, all perturbed;
    dog/4 analysed but not in the sample."""
    shard0 = result_table([perturbed("cat/1.png", "cat", 1, 1, [4, 2, 0], [4, 4, 3], [4, 3, 2]),
                           perturbed("cat/2.png", "cat", 1, 0, [6, 1, 1], [6, 6, 6], [6, 5, 4])])
    shard1 = result_table([perturbed("dog/3.png", "dog", 0, 0, [2, 0, -2], [2, 2, 2], [2, 2, 0], shard=1),
                           image("dog/4.png", "dog", 0, record(0, HEATMAP), shard=1)])
    write_run(tmp_path / "run", {0: shard0, 1: shard1})
    return tmp_path / "run"


def test_image_aopc_is_the_start_logit_minus_the_mean_of_later_steps(run_dir):
    aopc = image_aopc(open_run(run_dir).faithfulness)
    got = {(row.image_id, row.order): row.aopc for row in aopc.itertuples()}
    # cat/1 morf: 4 - mean(2, 0) = 3; lerf: 4 - mean(4, 3) = 0.5; random: 4 - mean(3, 2) = 1.5
    assert got[("cat/1.png", "morf")] == 3.0 and got[("cat/1.png", "lerf")] == 0.5 and got[("cat/1.png", "random")] == 1.5
    assert got[("cat/2.png", "morf")] == 5.0 and got[("dog/3.png", "morf")] == 3.0 and got[("dog/3.png", "random")] == 1.0
    assert len(aopc) == 9  # dog/4 was not sampled


def test_class_aopc_is_the_mean_over_the_class_sampled_images_in_both_groupings(run_dir):
    by_class, _ = class_faithfulness(open_run(run_dir).store)
    table = by_class.set_index(["by", "class"])
    assert table.loc[("label", "cat"), ["images", "aopc_morf", "aopc_lerf", "aopc_random"]].tolist() == [2, 4.0, 0.25, 1.5]
    assert table.loc[("label", "cat"), "morf_minus_random"] == 2.5
    assert table.loc[("label", "dog"), ["images", "aopc_morf", "aopc_random"]].tolist() == [1, 3.0, 1.0]
    # by prediction: class "0" holds cat/2 (5.0) and dog/3 (3.0), class "1" cat/1
    assert table.loc[("pred", "0"), ["images", "aopc_morf"]].tolist() == [2, 4.0]
    assert table.loc[("pred", "1"), "aopc_morf"] == 3.0


def test_class_curves_are_the_mean_logit_drop_at_each_step(run_dir):
    _, curves = class_faithfulness(open_run(run_dir).store)
    cat = curves[(curves["by"] == "label") & (curves["class"] == "cat") & (curves["order"] == "morf")]
    # drops: cat/1 [0, 2, 4], cat/2 [0, 5, 5]
    assert cat["drop"].tolist() == [0.0, 3.5, 4.5]
    assert cat["fraction"].tolist() == [0.0, 0.25, 0.5] and cat["images"].tolist() == [2, 2, 2]


def test_the_reducer_puts_the_per_class_aopc_in_the_class_table(run_dir):
    reduce_run(run_dir)
    run = open_run(run_dir)
    heatmaps = run.class_heatmaps.set_index(["by", "class"])
    assert heatmaps.loc[("label", "dog"), "faithfulness_images"] == 1  # dog/4 not sampled
    assert heatmaps.loc[("label", "cat"), "aopc_morf"] == 4.0
    assert heatmaps.loc[("label", "dog"), "aopc_lerf"] == 0.0
    curves = run.faithfulness_curves
    assert set(curves["order"]) == {"morf", "lerf", "random"} and set(curves["by"]) == {"label", "pred"}


def test_a_run_without_curves_reduces_with_null_aopc(tmp_path):
    write_run(tmp_path / "run", {0: result_table([image("a/1.png", "a", 0, record(0, HEATMAP))])})
    reduce_run(tmp_path / "run")
    run = open_run(tmp_path / "run")
    assert run.class_heatmaps["faithfulness_images"].tolist() == [0, 0]
    assert run.class_heatmaps["aopc_morf"].isna().all()
    assert run.faithfulness_curves.empty


def test_curves_of_many_images_match_a_direct_computation(tmp_path):
    """Random curves over several shards: the streamed per-class means equal one pandas pass."""
    rng = np.random.default_rng(0)
    shards = {}
    for shard in range(3):
        rows = []
        for i in range(7):
            logits = {order: rng.normal(size=4).round(3).tolist() for order in ("morf", "lerf", "random")}
            label = str(rng.integers(0, 3))
            rows.append(perturbed(f"{shard}/{i}.png", label, int(label), int(rng.integers(0, 3)), logits["morf"],
                                  logits["lerf"], logits["random"], shard=shard))
        shards[shard] = result_table(rows)
    write_run(tmp_path / "run", shards)
    points = open_run(tmp_path / "run").faithfulness
    by_class, _ = class_faithfulness(open_run(tmp_path / "run").store)
    start = points[points["step"] == 0].set_index(["image_id", "order"])["logit"]
    points["logit"] = points["logit"].astype(np.float64)
    later = points[points["step"] > 0].groupby(["image_id", "order"])["logit"].mean()
    expected = (start - later).rename("aopc").reset_index().merge(points[["image_id", "label"]].drop_duplicates(), on="image_id")
    expected = expected.groupby(["label", "order"])["aopc"].mean().unstack()
    got = by_class[by_class["by"] == "label"].set_index("class")
    for order in ("morf", "lerf", "random"):
        pd.testing.assert_series_equal(got[f"aopc_{order}"].sort_index(), expected[order].sort_index(),
                                       check_names=False, check_index_type=False, atol=1e-5)
