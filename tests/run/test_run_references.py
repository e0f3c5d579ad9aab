"""Reference images per neuron (docs/method.md §18, "Reference images"): the actor's conditional
heatmaps against the explainer called here (and the linearity of §6: a layer's single-channel
heatmaps add up to the full one), without a cluster; then `lrpscale strategies` on a copy of the
demo run on Ray: references.parquet against the stored relevances, its crops against heatmaps
computed here."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest
import torch

from lrpscale import cli
from lrpscale.config import AnalysisConfig
from lrpscale.engine.explainer import Explainer
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.inputs import decoding, sources
from lrpscale.results import open_run
from lrpscale.results.references import channel_layer, crop_box, crop_pictures, read_references
from lrpscale.run.actor import AnalyzerActor
from lrpscale.storage.store import RunStore

IMAGES = 5


@pytest.fixture(scope="module")
def demo_model():
    return load_model("vgg16", "demo")


@pytest.fixture(scope="module")
def decoded(digits_folder):
    """Five digits decoded as the audit's CPU tasks decode them (uint8), with a target column."""
    listing = sources.list_inputs(digits_folder).slice(0, IMAGES)
    batch = decoding.decode_rows(listing, 32)
    batch["target"] = np.array([3, 1, 4, 1, 5])
    return batch


def _normalised(model, batch) -> torch.Tensor:
    """The model input computed apart from the actor: the 0..1 pixels normalised with the model's statistics."""
    mean, std = (torch.tensor(v, dtype=torch.float32).reshape(1, 3, 1, 1) for v in input_normalization(model))
    return (torch.from_numpy(batch["pixels"]).float() / 255.0 - mean) / std


def test_the_actors_conditional_heatmaps_are_the_explainers(demo_model, decoded):
    """Mixed layers, rows with one to three neurons (so a pass pads its conditions), a row asked
    twice, each request against ``explain(x, target, restrict={layer: [neuron]})`` here."""
    explainer = Explainer(demo_model)
    x = _normalised(demo_model, decoded)
    full = explainer.explain(x, torch.from_numpy(decoded["target"]))
    top = {layer: full.layers[layer].reshape(IMAGES, full.layers[layer].shape[1], -1).sum(2).argsort(1, descending=True).tolist()
           for layer in ("features.21", "features.28", "classifier.0")}  # neurons that hold relevance
    requests = [(0, "features.28", top["features.28"][0][0]), (2, "features.28", top["features.28"][2][1]),
                (0, "features.28", top["features.28"][0][2]), (1, "features.21", top["features.21"][1][0]),
                (4, "classifier.0", top["classifier.0"][4][0]), (2, "features.28", top["features.28"][2][1]),
                (3, "features.28", top["features.28"][3][0]), (0, "conv5_3", top["features.28"][0][1])]
    actor = AnalyzerActor("vgg16", "demo", AnalysisConfig().to_dict(), device="cpu", batch_size=4)
    heatmaps = actor.conditional_heatmaps(decoded, requests)
    for (row, layer, neuron), heatmap in zip(requests, heatmaps):
        target = torch.tensor([int(decoded["target"][row])])
        expected = explainer.explain(x[row:row + 1], target, restrict={layer: [neuron]}).relevance[0].sum(0).numpy()
        assert heatmap.shape == (32, 32)
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(heatmap, expected, rtol=0, atol=1e-5 * scale)
    cropped = actor.conditional_heatmaps(decoded, requests[:2], crop=lambda pixels, heatmap: (pixels.shape, crop_box(heatmap)))
    assert cropped == [((3, 32, 32), crop_box(heatmaps[0])), ((3, 32, 32), crop_box(heatmaps[1]))]


def test_single_channel_heatmaps_add_up_to_the_full_heatmap(demo_model, decoded):
    """Linearity (docs/method.md §6): one condition per channel of conv5_3 (64), summed, is the
    unrestricted heatmap of explain(x) here; an image that did not decode gives None."""
    actor = AnalyzerActor("vgg16", "demo", AnalysisConfig().to_dict(), device="cpu", batch_size=16)
    batch = {name: column[:2] for name, column in decoded.items()}
    batch["ok"] = np.array([True, False])
    requests = [(0, "features.28", c) for c in range(64)] + [(1, "features.28", 0)]
    heatmaps = actor.conditional_heatmaps(batch, requests)
    assert heatmaps[-1] is None
    full = Explainer(demo_model).explain(_normalised(demo_model, batch)[:1], torch.tensor([3])).relevance[0].sum(0).numpy()
    total = np.sum(heatmaps[:64], axis=0)
    np.testing.assert_allclose(total, full, rtol=0, atol=1e-4 * np.abs(full).max())
    assert np.abs(heatmaps[5] - full).max() > 1e-2 * np.abs(full).max()  # one channel alone is not the whole


# --- on Ray, on the demo run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def referenced(demo_runs, tmp_path_factory):
    """The demo run copied (the shared one must not change), reduced, with `lrpscale strategies`
    run on it: strategies, then references."""
    run = tmp_path_factory.mktemp("references") / "run"
    shutil.copytree(demo_runs["run"], run)
    assert cli.main(["strategies", str(run)]) == 0
    return run


def _scores(run) -> dict[str, pd.DataFrame]:
    """Per layer the score of every (image, neuron) computed here from the stored tables: the
    channel relevance at the swept layer, the selected relevance over |logit| elsewhere."""
    images = run.arrow("images", ["image_id", "label", "pred", "logit", "channel_relevance"])
    values = images.column("channel_relevance").combine_chunks().to_numpy_ndarray().astype(np.float32)
    ids = images.column("image_id").to_pylist()
    frame = images.select(["image_id", "label", "pred", "logit"]).to_pandas()
    frame["pred"] = frame["pred"].astype(str)
    swept = pd.DataFrame({"image_id": np.repeat(ids, values.shape[1]), "neuron": np.tile(np.arange(values.shape[1]),
                                                                                        len(ids)),
                          "score": values.ravel()}).merge(frame, on="image_id")
    neurons = run.neurons[["image_id", "layer", "neuron", "relevance"]].drop_duplicates(["image_id", "layer", "neuron"])
    other = neurons.merge(frame, on="image_id")
    other["score"] = (other["relevance"].astype(np.float64) / other["logit"].abs().astype(np.float64)).astype(np.float32)
    return {"swept": swept, "other": other}


@pytest.mark.slow
def test_references_hold_the_top_images_of_each_neuron_and_scope(referenced):
    run = open_run(referenced)
    table = read_references(run.store)
    assert run.references[["layer", "neuron", "scope", "rank", "image_id"]].equals(
        table[["layer", "neuron", "scope", "rank", "image_id"]])
    settings = json.loads((referenced / "classes" / "references.json").read_text())
    layer = channel_layer(run.info)
    assert settings["channel_layer"] == layer == "features.28" and settings["settings"]["images"] == 8
    assert settings["rows"] == len(table) > 0 and table["crop"].notna().all()
    assert set(table["measure"]) == {"channel_relevance", "selected_relevance"}
    scores = _scores(run)
    keys = ["layer", "neuron", "scope", "grouping", "class"]
    for key, rows in table.groupby(keys, dropna=False, sort=False):
        layer_of, neuron_of, scope, grouping, cls = key
        source = scores["swept"] if layer_of == layer else scores["other"][scores["other"]["layer"] == layer_of]
        mine = source[source["neuron"] == neuron_of]
        if scope == "class":
            mine = mine[mine[grouping] == cls]
        mine = mine[mine["score"] > 0].sort_values(["score", "image_id"], ascending=[False, True], kind="stable")
        assert list(rows["rank"]) == list(range(len(rows)))
        assert list(rows["score"]) == sorted(rows["score"], reverse=True)
        assert len(rows) == min(8, len(mine)), key
        assert list(rows["image_id"]) == list(mine["image_id"].head(8)), key
        np.testing.assert_allclose(rows["score"], mine["score"].head(8), rtol=1e-6)
    # every distinguishing neuron of every cluster has its references, in the run and in its class
    present = set(map(tuple, table[keys].fillna("").to_numpy().tolist()))
    for cluster in run.strategy_clusters.to_dict("records"):
        for n in cluster["distinguishing_neurons"]:
            assert (n["layer"], n["neuron"], "run", "", "") in present
            assert (n["layer"], n["neuron"], "class", cluster["grouping"], cluster["class"]) in present


@pytest.mark.slow
def test_a_reference_crop_is_the_conditional_heatmap_computed_here(referenced, demo_model):
    """For one swept-layer and one lower-layer reference: explain(x, restrict={layer: [c]}) for the
    stored target, computed here from the decoded image, gives the stored box, picture and heatmap."""
    run = open_run(referenced)
    table = read_references(run.store)
    listing = RunStore(referenced).read_listing()
    targets = run.images.set_index("image_id")["target"]
    explainer = Explainer(demo_model)
    mean, std = input_normalization(demo_model)
    for measure in ("channel_relevance", "selected_relevance"):
        row = table[(table["measure"] == measure) & (table["scope"] == "run")].iloc[0]
        rows = listing.filter(pc.equal(listing.column("image_id"), row["image_id"]))
        columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
        pixels = decoding.decode_batch(columns, 32)["pixels"][0]
        x = torch.from_numpy(decoding.load_batch(columns, 32, mean, std)["pixels"])
        expected = explainer.explain(x, torch.tensor([int(targets[row["image_id"]])]),
                                     restrict={row["layer"]: [int(row["neuron"])]}).relevance[0].sum(0).numpy()
        crop = row["crop"]
        top, left, bottom, right = crop_box(expected)
        assert (crop["top"], crop["left"], crop["bottom"], crop["right"]) == (top, left, bottom, right)
        picture, heatmap = crop_pictures(crop)
        np.testing.assert_array_equal(np.round(picture * 255).astype(np.uint8),
                                      pixels[:, top:bottom, left:right].transpose(1, 2, 0))
        part = expected[top:bottom, left:right]
        np.testing.assert_allclose(heatmap, part, rtol=0, atol=1e-3 * np.abs(part).max())


@pytest.mark.slow
def test_no_references_skips_them_and_removes_earlier_ones(referenced, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(referenced, run)
    capsys.readouterr()
    assert cli.main(["strategies", str(run), "--no-references"]) == 0
    assert "references:" not in capsys.readouterr().out
    assert not (run / "classes" / "references.json").exists()
    assert not (run / "classes" / "references.parquet").exists()
    assert read_references(RunStore(run)).empty and open_run(run).references.empty
