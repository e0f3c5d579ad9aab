"""The synthetic ImageNet-style run: real per-image row counts, readable as a run, reducible, and
the pushed-down queries of benchmarks/imagenet_scale.py equal to plain pandas."""
from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lrpscale import load_model
from lrpscale.config import AnalysisConfig
from lrpscale.engine.analyzer import Analyzer
from lrpscale.results import open_run
from lrpscale.results.reducer import _fold, class_graph, reduce_run
from lrpscale.run.synthetic import PATH_LAYERS, generate_run, row_counts
from lrpscale.storage.store import RunStore

IMAGES, CLASSES = 2560, 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "run"
    generate_run(root, IMAGES, CLASSES, processes=1)
    return root


@pytest.fixture(scope="module")
def queries():
    spec = importlib.util.spec_from_file_location(
        "imagenet_scale", Path(__file__).resolve().parents[2] / "benchmarks" / "imagenet_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_counts_match_a_real_analysis():
    """The count rule against a real Analyzer on the demo model (VGG16 topology, 1/8 width)."""
    torch.manual_seed(0)
    model = load_model("vgg16", weights="demo")
    analysis = Analyzer(model)(torch.randn(6, 3, 32, 32) * 2)
    for record in analysis.records():
        k_star = [s["k"] for s in record["scores"] if s["chosen"] and s["variant"] == "fidelity"]
        expected = row_counts(np.array(k_star))
        assert len(record["neurons"]) == expected["neurons"][0]
        assert len(record["edges"]) == expected["edges"][0]
        assert len(record["scores"]) == expected["scores"][0]
        assert len(record["deconv"]) == expected["deconv"][0]
        assert len({n["layer"] for n in record["neurons"]}) == len(PATH_LAYERS)


def test_generated_run_has_real_shapes_and_counts(run_dir):
    run = open_run(run_dir)
    images = run.images
    assert len(images) == IMAGES and images.image_id.is_unique
    assert images.label.nunique() == CLASSES
    assert images.image_id.str.match(r"^n\d{8}/n\d{8}_\d+\.JPEG$").all()
    assert (images.image_id.str[:9] == images.label).all()
    assert list(images.label) == sorted(images.label)  # clustered by class, as a folder walk lists it
    assert len(np.asarray(images.heatmap.iloc[0])) == AnalysisConfig().heatmap_size ** 2
    # heatmaps are smooth: neighbouring pixels correlate, unlike white noise
    heat = np.asarray(images.heatmap.iloc[0], np.float32).reshape(56, 56)
    assert np.corrcoef(heat[:, :-1].ravel(), heat[:, 1:].ravel())[0, 1] > 0.5
    scores = run.scores
    k_star = scores[scores.chosen & (scores.variant == "fidelity")].set_index("image_id").k
    assert k_star.index.is_unique and len(k_star) == IMAGES
    expected = row_counts(k_star.to_numpy())
    for table in ("neurons", "edges", "scores", "deconv"):
        per_image = getattr(run, table).groupby("image_id").size().reindex(k_star.index)
        assert (per_image.to_numpy() == expected[table]).all(), table
    assert len(run.errors) == 0
    assert run.info["status"] == "complete" and len(list((run_dir / "_commits").glob("*.json"))) == 10


@pytest.mark.slow  # the whole reducer against pandas over every table
def test_reducer_on_synthetic_run_matches_pandas(run_dir):
    reduce_run(run_dir)
    run = open_run(run_dir)
    images, neurons = run.images, run.neurons
    sizes = images.groupby("label").size()
    nodes = run.class_nodes.set_index(["by", "class", "layer", "neuron"])
    counts = neurons.groupby(["label", "layer", "neuron"]).size()
    for (label, layer, neuron), count in counts.items():
        assert nodes.loc[("label", label, layer, neuron), "frequency"] == pytest.approx(count / sizes[label])
    # the one-file chosen-k table holds exactly the scores table's chosen rows
    keys = ["image_id", "layer", "variant"]
    chosen = run.scores[run.scores.chosen].drop(columns="chosen").sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(run.chosen_scores.sort_values(keys, ignore_index=True), chosen[run.chosen_scores.columns])
    assert len(chosen) == 2 * IMAGES  # one fidelity and one forward row per image
    preds = images.groupby("pred").size()
    assert run.class_heatmaps[run.class_heatmaps.by == "pred"].set_index("class").images.to_dict() == {
        str(p): n for p, n in preds.items()}
    # class graphs from the reducer's bounded edge table equal those from every edge counted in pandas
    edges = run.edges
    keys = ["layer_from", "neuron_from", "layer_to", "neuron_to"]
    full = edges.groupby(["label", *keys]).agg(count=("relevance", "size"), sum_relevance=("relevance", "sum"))
    full = full.reset_index().rename(columns={"label": "class"}).assign(by="label")
    full = full.merge(sizes.rename("class_images"), left_on="class", right_index=True)
    full["frequency"] = full["count"] / full["class_images"]
    full["mean_relevance"] = full["sum_relevance"] / full["count"]
    different_class_graphs = 0
    for label in sizes.index:
        mine = run.class_graph(label)
        theirs = class_graph(run.class_nodes, full, "label", label)
        assert set(mine.nodes) == set(theirs.nodes)
        assert set(mine.edges) == set(theirs.edges) and mine.number_of_edges() > 0
        different_class_graphs += set(mine.nodes) != set(run.class_graph(sizes.index[0]).nodes)
    assert different_class_graphs == CLASSES - 1  # class-dependent neurons: every class has its own graph


@pytest.mark.slow  # every edge row of the run against pandas
def test_reducer_edges_equal_pandas_among_each_class_strongest(run_dir):
    """edges.parquet against pandas over every edge row: counts and means of the edges whose
    ends are among the class's ``edge_nodes`` most frequent neurons (ties: higher mean
    relevance, then lower neuron) or its ``edge_nodes`` most frequent targets."""
    per_class, keys = 3, ["layer_from", "neuron_from", "layer_to", "neuron_to"]
    classes_dir = reduce_run(run_dir, edge_nodes=per_class)
    mine = pd.read_parquet(classes_dir / "edges.parquet")
    run = open_run(run_dir)
    images, neurons, edges = run.images, run.neurons, run.edges
    expected = []
    for by in ("label", "pred"):
        nodes = neurons.assign(cls=neurons[by].astype(str), relevance=neurons.relevance.astype(np.float64))
        nodes = nodes.groupby(["cls", "layer", "neuron"]).agg(count=("relevance", "size"), total=("relevance", "sum"))
        nodes = nodes.reset_index().assign(mean=lambda f: f.total / f["count"])
        top = nodes.sort_values(["cls", "layer", "count", "mean", "neuron"], ascending=[True, True, False, False, True])
        top = top.groupby(["cls", "layer"]).head(per_class)
        targets = images.assign(cls=images[by].astype(str)).groupby(["cls", "target"]).size().rename("n").reset_index()
        targets = targets.sort_values(["cls", "n", "target"], ascending=[True, False, True]).groupby("cls").head(per_class)
        kept = set(zip(top.cls, top.layer, top.neuron)) | {(c, "output", t) for c, t in zip(targets.cls, targets.target)}
        rows = edges.assign(cls=edges[by].astype(str), relevance=edges.relevance.astype(np.float64))
        inside = [(c, lf, nf) in kept and (c, lt, nt) in kept for c, lf, nf, lt, nt in zip(
            rows.cls, rows.layer_from, rows.neuron_from, rows.layer_to, rows.neuron_to)]
        counted = rows[inside].groupby(["cls", *keys]).relevance.agg(["size", "mean"]).reset_index()
        expected.append(counted.rename(columns={"cls": "class", "size": "count", "mean": "mean_relevance"}).assign(by=by))
    expected = pd.concat(expected).sort_values(["by", "class", *keys], ignore_index=True)
    mine = mine.sort_values(["by", "class", *keys], ignore_index=True)
    assert len(mine) == len(expected) > 0
    assert (images.groupby("label").pred.nunique() > per_class).any()  # the target limit is exercised
    pd.testing.assert_frame_equal(mine[["by", "class", *keys, "count"]], expected[["by", "class", *keys, "count"]],
                                  check_dtype=False)
    assert np.allclose(mine.mean_relevance, expected.mean_relevance, rtol=1e-9)
    assert np.allclose(mine.frequency, mine["count"] / mine.class_images)


def test_queries_with_pushdown_equal_pandas(run_dir, queries):
    reduce_run(run_dir)  # worst_explained_reduced reads the reducer's table
    probe = queries._probe(run_dir)
    for query in queries.QUERIES.values():
        fast, slow = query(run_dir, probe, True), query(run_dir, probe, False)
        if isinstance(fast, np.ndarray):
            assert np.array_equal(fast, slow)
            assert np.allclose(fast, open_run(run_dir).heatmap(probe["image_id"]))
        elif isinstance(fast, pd.Series):
            pd.testing.assert_series_equal(fast, slow)
        else:
            pd.testing.assert_frame_equal(fast.reset_index(drop=True), slow.reset_index(drop=True)[fast.columns])
        assert len(fast) > 0
    worst = queries.worst_explained(run_dir, probe, True)
    scores = open_run(run_dir).scores
    chosen = scores[scores.chosen & (scores.variant == "fidelity")]
    assert len(worst) == 100 and worst.smape.min() >= chosen.smape.nlargest(100).min()
    assert (queries.class_images(run_dir, probe, True).label == probe["label"]).all()


def test_fold_is_independent_of_chunk_size(run_dir):
    columns = ["label", "pred", "layer", "k", "variant", "mse", "smape", "chosen"]
    one = _fold(RunStore(run_dir), "scores", columns, ("layer", "k", "variant"), ("mse", "smape", "chosen"), rows=1 << 20)
    many = _fold(RunStore(run_dir), "scores", columns, ("layer", "k", "variant"), ("mse", "smape", "chosen"), rows=300)
    pd.testing.assert_frame_equal(one, many, check_exact=False, rtol=1e-9)
    counts = collections.Counter(zip(one["by"], one["class"]))
    assert len(counts) >= CLASSES
