"""Planted cues are found (issue 13): SpRAy ranks the class that carries a planted mark first among
the 10 (by label), and its clusters separate the marked images from the unmarked ones.

First on the clever-hans demo as `lrpscale demo --dataset clever-hans` runs it (the bundled model,
trained on the digits with a 3x3 block on half of the 3s); then on a second planted set built and
trained here (another class, another mark shape, another place, another draw of the marked
images), so that the result is no accident of one dataset or one model. Then the control: the same
images audited with the digits demo model, which never saw a mark, do not put the class first;
their clusters still follow the mark (LRP's first-layer rule gives bright pixels relevance), so
the rank is what tells a model that relies on the mark.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lrpscale import cli
from lrpscale.config import RunConfig
from lrpscale.demo_data import (
    CLEVER_HANS,
    CLEVER_HANS_CUE,
    PlantedCue,
    digits_split,
    is_marked,
    planted_digits,
    write_planted,
)
from lrpscale.engine.models import IMAGENET_MEAN, IMAGENET_STD
from lrpscale.results import open_run
from lrpscale.results.references import read_references
from lrpscale.run.audit import run_audit
from lrpscale.run.strategies import run_strategies

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_models.py"
MIN_PURITY = 0.9
MAX_CLUSTERS = 6
#: The second planted set: a ring (a 4x3 rectangle's border) on the left edge of the lower half, on
#: half of the 9s; the demo's cue is a filled 3x3 block in the top left corner, on half of the 3s.
SECOND_CUE = PlantedCue(cls=9, shape="ring", size=(4, 3), position=(4, 0), seed=1)


def _script():
    """scripts/train_demo_models.py as a module (scripts/ is no package)."""
    if "train_demo_models" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_demo_models", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["train_demo_models"]


def size_weighted_purity(clusters: pd.Series, marked: pd.Series) -> float:
    """Sum over clusters of the larger of (marked, unmarked) members, divided by all images: 1 when
    every cluster holds only marked or only unmarked images, 0.5 for a 50/50 class kept whole."""
    counts = pd.crosstab(clusters.to_numpy(), marked.to_numpy())
    return float(counts.max(axis=1).sum() / counts.to_numpy().sum())


def found(run: Path, cue: PlantedCue) -> dict:
    """What SpRAy says about the planted class of ``run``, by label: its rank, cluster count,
    connectivity (and the next class's), and the size-weighted purity of its clusters with respect
    to the mark (read from the image ids: marked files end in -marked)."""
    opened = open_run(run)
    classes = opened.strategy_classes
    classes = classes[classes["grouping"] == "label"].sort_values("rank", ignore_index=True)
    row = classes[classes["class"] == str(cue.cls)].iloc[0]
    members = opened.strategies
    members = members[(members["grouping"] == "label") & (members["class"] == str(cue.cls))]
    marked = members["image_id"].map(is_marked)
    # a random half of the class as the "mark": the clusters must not be pure with respect to that
    shuffled = pd.Series(np.random.default_rng(0).permutation(marked.to_numpy()))
    return {"rank": int(row["rank"]), "classes": len(classes), "clusters": int(row["clusters"]),
            "connectivity": float(row["connectivity"]),
            "next": classes.loc[classes["class"] != str(cue.cls), ["class", "connectivity"]].iloc[0].tolist(),
            "marked": int(marked.sum()), "images": len(marked),
            "purity": size_weighted_purity(members["cluster"], marked),
            "chance_purity": size_weighted_purity(members["cluster"], shuffled)}


def assert_cue_found(result: dict, cue: PlantedCue) -> None:
    assert result["classes"] == 10
    assert 0 < result["marked"] < result["images"]
    assert result["rank"] == 1, f"class {cue.cls} is not ranked first: {result}"
    assert result["clusters"] <= MAX_CLUSTERS, result
    assert result["purity"] >= MIN_PURITY, result
    assert result["chance_purity"] < 0.75, result  # the purity measures the mark, not the cluster count


@pytest.fixture(scope="module")
def clever_hans_demo(ray_session, tmp_path_factory):
    """`lrpscale demo --dataset clever-hans` into a temporary folder; returns the folder."""
    output = tmp_path_factory.mktemp("clever-hans") / "demo"
    started = time.perf_counter()
    assert cli.main(["demo", "--dataset", CLEVER_HANS, "--output", str(output)]) == 0
    print(f"clever-hans demo: {time.perf_counter() - started:.0f} s")
    return output


def test_the_demo_marks_half_of_one_class_and_says_which(clever_hans_demo):
    marks = pd.read_csv(clever_hans_demo / "data" / f"{CLEVER_HANS}-marks.csv", dtype={"label": str})
    images, labels, marked = planted_digits(CLEVER_HANS_CUE)
    assert len(marks) == len(images) and marks["marked"].to_numpy().tolist() == marked.tolist()
    assert set(marks.loc[marks["marked"], "label"]) == {str(CLEVER_HANS_CUE.cls)}
    assert marks.loc[marks["marked"], "image_id"].map(is_marked).all()
    assert not marks.loc[~marks["marked"], "image_id"].map(is_marked).any()
    assert abs(marked[labels == CLEVER_HANS_CUE.cls].mean() - CLEVER_HANS_CUE.fraction) < 0.01
    run = open_run(clever_hans_demo / "run")
    assert set(run.images["image_id"]) == set(marks["image_id"])


def test_the_clever_hans_class_ranks_first_and_its_clusters_split_marked_from_unmarked(clever_hans_demo):
    result = found(clever_hans_demo / "run", CLEVER_HANS_CUE)
    print(f"clever-hans: {result}")
    assert_cue_found(result, CLEVER_HANS_CUE)
    # the report's Strategies section opens with that class
    page = (clever_hans_demo / "run" / "report.html").read_text()
    assert re.search(r'<article class=card id="strategies-([^"]+)"', page).group(1) == str(CLEVER_HANS_CUE.cls)
    # the top reference images of the marked cluster's first distinguishing neuron are marked
    # images, and their crops cover the mark (CLEVER_HANS_CUE.box(32) in the 32x32 input)
    run = open_run(clever_hans_demo / "run")
    strategies = run.strategies[(run.strategies["grouping"] == "label")
                                & (run.strategies["class"] == str(CLEVER_HANS_CUE.cls))]
    marked_cluster = strategies.assign(marked=strategies["image_id"].map(is_marked)).groupby("cluster")[
        "marked"].mean().idxmax()
    clusters = run.strategy_clusters
    row = clusters[(clusters["grouping"] == "label") & (clusters["class"] == str(CLEVER_HANS_CUE.cls))
                   & (clusters["cluster"] == marked_cluster)].iloc[0]
    first = row["distinguishing_neurons"][0]
    references = read_references(run.store, first["layer"], int(first["neuron"]))
    top = references[(references["scope"] == "class") & (references["class"] == str(CLEVER_HANS_CUE.cls))
                     & (references["grouping"] == "label")].sort_values("rank").head(4)
    assert len(top) == 4 and all(is_marked(image_id) for image_id in top["image_id"]), top["image_id"].tolist()
    mark_top, mark_left, mark_bottom, mark_right = CLEVER_HANS_CUE.box(32)
    for crop in top["crop"]:
        assert crop["top"] <= mark_top and crop["left"] <= mark_left, crop
        assert crop["bottom"] >= mark_bottom and crop["right"] >= mark_right, crop


def audited(source: Path, output: Path, weights: str, **options) -> Path:
    """``source`` audited into ``output`` with ``weights``, then its strategies (no reference images)."""
    run_audit(RunConfig(input=str(source), output=str(output), weights=weights, batch_size=64, **options),
              progress=False)
    run_strategies(output, references=False)
    return output


@pytest.fixture(scope="module")
def second_set(ray_session, tmp_path_factory) -> dict:
    """The digits with ``SECOND_CUE`` planted, as PNG files, and a model trained on them here with
    the script's training function: {"source": folder, "weights": state dict file, "seconds"}."""
    root = tmp_path_factory.mktemp("planted")
    script = _script()
    images, labels, _ = planted_digits(SECOND_CUE)
    train_index, _ = digits_split()
    # the bundled clever-hans model's recipe (30 epochs). Measured with this cue: 25 and 30 epochs rank
    # class 9 first for three draws of the marked 9s; the ring on the 0s at the top right ranked
    # first at 20 epochs only with 6 clusters, and its control (below) ranked first as well
    recipe = script.RECIPES[CLEVER_HANS]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(script.THREADS)  # as the script trains: the same weights on every run
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        # normalised as `load_model` normalises a state dict file (ImageNet's mean and std)
        model = script.train(recipe, script.greyscale_inputs(images[train_index]),
                             torch.from_numpy(labels[train_index]), IMAGENET_MEAN, IMAGENET_STD)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - started
    torch.save(model.state_dict(), root / "planted.pt")
    return {"source": write_planted(root / "data", SECOND_CUE, "planted"), "weights": root / "planted.pt",
            "seconds": seconds}


def test_a_second_planted_set_trained_here_is_found_the_same_way(second_set, tmp_path):
    started = time.perf_counter()
    run = audited(second_set["source"], tmp_path / "run", str(second_set["weights"]), image_size=32)
    result = found(run, SECOND_CUE)
    print(f"second planted set: trained in {second_set['seconds']:.0f} s, audit and strategies "
          f"{time.perf_counter() - started:.0f} s; {result}")
    assert_cue_found(result, SECOND_CUE)


@pytest.mark.parametrize("which", ["clever-hans", "second"])
def test_a_model_that_never_saw_the_mark_does_not_rank_its_class_first(which, request, tmp_path):
    """The control: the digits demo model, trained on the unmarked digits, on the same images."""
    if which == "clever-hans":
        source, cue = request.getfixturevalue("clever_hans_demo") / "data" / CLEVER_HANS, CLEVER_HANS_CUE
    else:
        source, cue = request.getfixturevalue("second_set")["source"], SECOND_CUE
    result = found(audited(source, tmp_path / "run", "demo"), cue)
    print(f"control, {which}: {result}")
    assert result["rank"] > 1, result
