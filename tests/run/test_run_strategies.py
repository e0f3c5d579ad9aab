"""`lrpscale strategies` and `lrpscale reduce` on Ray (lrpscale.run.strategies), on copies of the demo
runs: the three tables under classes/, every analysed image once per grouping, the channel relevance
the real analyser stores; bad input refused before Ray starts."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from lrpscale import cli
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import build_vgg
from lrpscale.results import open_run
from tests.helpers.runs import image, record, result_table, write_run

TABLES = ("strategies.parquet", "strategy_classes.parquet", "strategy_clusters.parquet", "strategies.json")


@pytest.fixture(scope="module")
def demo_copy(demo_runs, tmp_path_factory):
    """The demo run copied (the shared one must not change), with `lrpscale strategies` run on it."""
    run = tmp_path_factory.mktemp("strategies") / "run"
    shutil.copytree(demo_runs["run"], run)
    assert cli.main(["strategies", str(run)]) == 0
    return run


@pytest.mark.slow
def test_strategies_command_writes_every_analysed_image_once_per_grouping(demo_copy):
    assert all((demo_copy / "classes" / name).is_file() for name in TABLES)
    run = open_run(demo_copy)
    images, strategies = run.images, run.strategies
    for grouping in ("label", "pred"):
        mine = strategies[strategies["grouping"] == grouping]
        assert sorted(mine["image_id"]) == sorted(images["image_id"])  # every demo image has a label
        assert (mine["class"] == mine["image_id"].map(images.set_index("image_id")[grouping].astype(str))).all()
    classes = run.strategy_classes
    assert len(classes) == images["label"].nunique() + images["pred"].nunique()
    for _, group in classes.groupby("grouping"):
        assert sorted(group["rank"]) == list(range(1, len(group) + 1))
        ranked = group.sort_values("rank")["connectivity"].tolist()
        assert ranked == sorted(ranked)
    clusters = run.strategy_clusters
    assert clusters.groupby(["grouping", "class"])["images"].sum().to_dict() == \
        classes.set_index(["grouping", "class"])["images"].to_dict()
    assert clusters.groupby(["grouping", "class"]).size().to_dict() == \
        classes.set_index(["grouping", "class"])["clusters"].to_dict()
    settings = json.loads((demo_copy / "classes" / "strategies.json").read_text())["settings"]
    assert settings["features"] == "heatmap" and settings["cap"] == 20000


@pytest.mark.slow
def test_the_analyser_stores_each_images_channel_relevance(demo_copy):
    """conv5_3 of the demo model has 64 channels; each image's values sum to 1 in |.|, and the
    selected conv5_3 neurons' relevances (neurons table) stand in the same ratios."""
    run = open_run(demo_copy)
    images = run.arrow("images", ["image_id", "channel_relevance"])
    values = images.column("channel_relevance").combine_chunks().to_numpy_ndarray().astype(np.float64)
    assert values.shape == (images.num_rows, 64)
    assert np.allclose(np.abs(values).sum(1), 1.0, atol=2e-3)
    row_of = {image_id: i for i, image_id in enumerate(images.column("image_id").to_pylist())}
    swept = run.scores["layer"].iloc[0]
    neurons = run.neurons[run.neurons["layer"] == swept]
    for image_id, selected in neurons.groupby("image_id"):
        stored = values[row_of[image_id], selected["neuron"].to_numpy()]
        top = selected["relevance"].abs().idxmax()
        scale = selected.loc[top, "relevance"] / values[row_of[image_id], selected.loc[top, "neuron"]]
        assert np.allclose(stored * scale, selected["relevance"], rtol=2e-3, atol=2e-3 * abs(scale))


@pytest.mark.slow
def test_channel_features_run_on_the_demo_run(demo_copy, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_copy, run)
    assert cli.main(["strategies", str(run), "--features", "channels", "--k", "5", "--seed", "3"]) == 0
    assert "look here first" in capsys.readouterr().out
    classes = open_run(run).strategy_classes
    assert set(classes["features"]) == {"channels"} and set(classes["k"]) == {5} and set(classes["seed"]) == {3}


@pytest.mark.slow
def test_reduce_runs_strategies_unless_told_not_to(demo_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_runs["run"], run)
    assert cli.main(["reduce", str(run), "--no-pictures", "--no-strategies"]) == 0
    assert not any((run / "classes" / name).exists() for name in TABLES)
    assert cli.main(["reduce", str(run), "--no-pictures", "--no-references"]) == 0
    assert all((run / "classes" / name).is_file() for name in TABLES)
    assert len(open_run(run).strategies) == 2 * len(open_run(run).images)
    assert not (run / "classes" / "references.json").exists() and open_run(run).references.empty
    assert not (run / "classes" / "_partitions").exists()  # the regrouped rows are gone


def test_the_analyzer_records_the_first_swept_layers_channel_relevance_over_its_sum():
    torch.manual_seed(0)
    model = build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).eval()
    analyzer = Analyzer(model)
    analysis = analyzer(torch.rand(3, 3, 32, 32))
    relevance = analysis.sweeps[analyzer.sweep_layers[0]].relevance.double()
    expected = relevance / relevance.abs().sum(1, keepdim=True)
    records = analysis.records()
    stored = np.stack([r["channel_relevance"] for r in records])
    assert stored.dtype == np.float32 and stored.shape == tuple(relevance.shape)
    assert np.allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-7)
    analysis.selected[analyzer.sweep_layers[0]].relevance.zero_()  # an image without relevance stays zero
    assert not np.any(analysis.records()[0]["channel_relevance"])


@pytest.mark.parametrize("arguments, message", [
    (["--cap", "0"], "cap must be at least 1"),
    (["--k", "0"], "k must be at least 1"),
    (["--features", "channels"], "use --features heatmap"),
])
def test_strategies_refuses_bad_settings_before_ray_starts(tmp_path, capsys, arguments, message):
    rows = [image("a/1.png", "a", 0, record(0, np.ones((2, 2))))]
    write_run(tmp_path / "run", {0: result_table(rows)})
    assert cli.main(["strategies", str(tmp_path / "run"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_strategies_refuses_a_folder_that_is_not_a_run_and_a_run_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["strategies", str(tmp_path / "empty")]) == 2
    assert "not an lrpscale run" in capsys.readouterr().err
    write_run(tmp_path / "failed", {0: result_table([image("x.png", "x", 0, error=("read", "OSError", "gone"))])})
    assert cli.main(["strategies", str(tmp_path / "failed")]) == 2
    assert "no analysed images" in capsys.readouterr().err
    assert not (tmp_path / "failed" / "classes").exists()


def test_the_summary_text_names_the_classes_to_look_at_first():
    from lrpscale.results.strategies import StrategySettings
    from lrpscale.run.strategies import StrategiesSummary

    classes = pd.DataFrame({"grouping": ["label", "label", "pred"], "class_name": ["cat", "dog", "cat"],
                            "rank": [2, 1, 1], "connectivity": [0.5, 0.001, 0.2], "clusters": [2, 3, 1]})
    text = StrategiesSummary(classes, "run/classes", 1.0, StrategySettings()).text()
    assert "by label: 2 classes, 2 with more than one strategy; look here first (lowest connectivity): dog (0.001, " \
           "3 clusters), cat (0.5, 2 clusters)" in text
    assert "by prediction: 1 classes, 0 with more than one strategy" in text
