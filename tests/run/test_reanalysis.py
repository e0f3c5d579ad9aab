"""Scheduled re-analysis and run comparison on a local Ray, with the bundled demo model.

New images only -> only they are analysed, each image once in the run; a changed model -> a new
run side by side and a comparison whose numbers equal a pandas recomputation from the two runs'
tables (written here from the tables, not from the reducer's or the comparison's code).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from lrpscale import cli
from lrpscale.config import RunConfig
from lrpscale.engine.models import load_model
from lrpscale.run.reanalysis import reanalyze, runs_under
from lrpscale.storage.store import COMMITS
from tests.helpers.digits import write_digits

pytestmark = pytest.mark.slow
TOP_NODES, MIN_EDGE_FREQUENCY = 8, 0.1


@pytest.fixture(scope="module")
def history(ray_session, tmp_path_factory):
    """Four re-analyses of one output root: first run, new images, nothing new, a changed model."""
    base = tmp_path_factory.mktemp("reanalysis")
    images, root = base / "images", base / "runs"
    first_ids = write_digits(images, range(0, 96))
    config = RunConfig(input=str(images), output=str(root), weights="demo", image_size=32, shard_size=32,
                       batch_size=32)
    first = reanalyze(config, root, progress=False)
    markers = {p.name: p.read_bytes() for p in (first.run / COMMITS).glob("*.json")}
    added_ids = write_digits(images, range(96, 136))
    second = reanalyze(config, root, progress=False)
    third = reanalyze(config, root, progress=False)

    # a retrained model: the demo weights with its classifier perturbed, saved as a user's file
    state = load_model("vgg16", "demo").state_dict()
    generator = torch.Generator().manual_seed(0)
    for key in state:
        if key.startswith("classifier"):
            state[key] = state[key] + 0.3 * state[key].abs().mean() * torch.randn(state[key].shape,
                                                                                  generator=generator)
    torch.save(state, base / "retrained.pth")
    fourth = reanalyze(replace(config, weights=str(base / "retrained.pth")), root, progress=False)
    return {"first": first, "second": second, "third": third, "fourth": fourth, "markers": markers,
            "first_ids": first_ids, "added_ids": added_ids, "root": root}


def test_new_images_only_are_analysed_once(history):
    first, second, third = history["first"], history["second"], history["third"]
    assert first.action == "new-run" and first.summary.analysed_now == 96
    assert second.action == "new-images" and second.run == first.run
    assert second.summary.analysed_now == len(history["added_ids"]) == 40
    assert third.action == "unchanged" and third.summary.analysed_now == 0
    # the shards of the first pass were not committed again
    for name, content in history["markers"].items():
        assert (first.run / COMMITS / name).read_bytes() == content
    for table in ("images", "scores", "neurons", "edges", "deconv"):
        frame = pd.read_parquet(first.run / table)
        assert set(frame.image_id) == history["first_ids"] | history["added_ids"]
    images = pd.read_parquet(first.run / "images")
    assert images.image_id.is_unique and len(images) == 136
    scores = pd.read_parquet(first.run / "scores")
    assert scores.groupby("image_id").size().nunique() == 1  # one analysis' worth of rows per image


def test_changed_model_gives_a_new_run_side_by_side(history):
    first, fourth = history["first"], history["fourth"]
    assert fourth.action == "new-run" and fourth.run != first.run and fourth.previous == first.run
    assert [p.name for p in runs_under(history["root"])] == [first.run.name, fourth.run.name]
    assert json.loads((fourth.run / "run.json").read_text())["model_id"] != json.loads(
        (first.run / "run.json").read_text())["model_id"]
    assert fourth.summary.analysed_now == 136
    assert (fourth.comparison_dir / "classes.parquet").is_file()
    assert json.loads((fourth.comparison_dir / "summary.json").read_text())["images_common"] == 136


def _unit_maps(images: pd.DataFrame) -> np.ndarray:
    maps = np.stack([np.asarray(h, np.float64) for h in images.heatmap])
    return maps / np.abs(maps).sum(1, keepdims=True)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _class_path(run, label: str) -> tuple[set, set]:
    """The class's critical-path neurons and edges, recomputed from the neurons and edges tables."""
    images = pd.read_parquet(run / "images", columns=["image_id", "label"])
    count = (images.label == label).sum()
    neurons = pd.read_parquet(run / "neurons", filters=[("label", "==", label)])
    stats = neurons.groupby(["layer", "neuron"]).agg(n=("image_id", "size"), r=("relevance", "mean")).reset_index()
    kept = stats.sort_values(["layer", "n", "r"], ascending=[True, False, False]).groupby("layer").head(TOP_NODES)
    nodes = set(zip(kept.layer, kept.neuron))
    edges = pd.read_parquet(run / "edges", filters=[("label", "==", label)])
    often = edges.groupby(["layer_from", "neuron_from", "layer_to", "neuron_to"]).size() / count
    chosen = {((lf, nf), (lt, nt)) for (lf, nf, lt, nt), f in often.items()
              if f >= MIN_EDGE_FREQUENCY and (lf, nf) in nodes and ((lt, nt) in nodes or lt == "output")}
    return nodes, chosen


def test_comparison_agrees_with_pandas(history):
    a, b = history["first"].run, history["fourth"].run
    classes = pd.read_parquet(history["fourth"].comparison_dir / "classes.parquet").set_index("class")
    images_a, images_b = pd.read_parquet(a / "images"), pd.read_parquet(b / "images")
    chosen = [("chosen", "==", True), ("variant", "==", "fidelity")]
    scores_a = pd.read_parquet(a / "scores", filters=chosen)
    scores_b = pd.read_parquet(b / "scores", filters=chosen)
    for label in sorted(images_a.label.unique()):
        row = classes.loc[label]
        for images, scores, key in ((images_a, scores_a, "a"), (images_b, scores_b, "b")):
            mine = images[images.label == label]
            assert row[f"images_{key}"] == len(mine)
            assert row[f"accuracy_{key}"] == pytest.approx((mine.label_index == mine.pred).mean())
            assert row[f"k_{key}"] == pytest.approx(scores[scores.label == label].k.mean())
            assert row[f"smape_{key}"] == pytest.approx(scores[scores.label == label].smape.mean(), rel=1e-5)
        mean_a = _unit_maps(images_a[images_a.label == label]).mean(0)
        mean_b = _unit_maps(images_b[images_b.label == label]).mean(0)
        assert row.heatmap_cosine == pytest.approx(_cos(mean_a, mean_b), abs=1e-5)
        assert row.heatmap_mse == pytest.approx(((mean_a - mean_b) ** 2).mean(), rel=1e-3)
        (nodes_a, edges_a), (nodes_b, edges_b) = _class_path(a, label), _class_path(b, label)
        assert row.node_jaccard == pytest.approx(len(nodes_a & nodes_b) / len(nodes_a | nodes_b))
        assert row.edge_jaccard == pytest.approx(len(edges_a & edges_b) / len(edges_a | edges_b))
        assert row.accuracy_change == pytest.approx(row.accuracy_b - row.accuracy_a)

    per_image = pd.read_parquet(history["fourth"].comparison_dir / "images.parquet").set_index("image_id")
    both = images_a.merge(images_b, on="image_id", suffixes=("_a", "_b"))
    assert len(per_image) == len(both) == 136
    maps_a, maps_b = _unit_maps(both.rename(columns={"heatmap_a": "heatmap"})), _unit_maps(
        both.rename(columns={"heatmap_b": "heatmap"}))
    for i, image_id in enumerate(both.image_id):
        assert per_image.loc[image_id, "heatmap_cosine"] == pytest.approx(_cos(maps_a[i], maps_b[i]), abs=1e-5)
        assert per_image.loc[image_id, "prediction_changed"] == (both.pred_a[i] != both.pred_b[i])
    # most changed first: prediction changes, then the lowest cosine
    ordered = pd.read_parquet(history["fourth"].comparison_dir / "images.parquet")
    assert list(ordered.prediction_changed) == sorted(ordered.prediction_changed, reverse=True)
    unchanged = ordered[~ordered.prediction_changed]
    assert list(unchanged.heatmap_cosine) == sorted(unchanged.heatmap_cosine)


def test_compare_command(history, tmp_path, capsys):
    a, b = history["first"].run, history["fourth"].run
    assert cli.main(["compare", str(a), str(b), "--output", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert f"run {a.name}" in printed and "136 in both" in printed
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["run_a"] == a.name and summary["run_b"] == b.name
    assert cli.main(["compare", str(tmp_path), str(b)]) == 2


def test_reduce_command(history, capsys):
    run = history["first"].run
    assert cli.main(["reduce", str(run), "--no-pictures"]) == 0
    assert f"classes: {run / 'classes'}" in capsys.readouterr().out
