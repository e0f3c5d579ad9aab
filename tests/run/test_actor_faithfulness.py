"""The audit's region perturbation stage on the actor class alone (no cluster): which images it
perturbs and that their stored curves are the engine's (docs/method.md §16)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lrpscale.config import AnalysisConfig
from lrpscale.engine.explainer import Explainer
from lrpscale.engine.faithfulness import ORDERS, region_perturbation
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.inputs import decoding, sources
from lrpscale.run.actor import AnalyzerActor
from lrpscale.run.sampling import image_seed, in_sample

IMAGES = 12


@pytest.fixture(scope="module")
def batch(digits_folder):
    """12 decoded digits for the bundled demo model (32 px), as a Ray batch."""
    model = load_model("vgg16", "demo")
    mean, std = input_normalization(model)
    listing = sources.list_inputs(digits_folder).slice(0, IMAGES)
    columns = {c: listing.column(c).to_numpy(zero_copy_only=False) for c in listing.column_names}
    out = decoding.load_batch(columns, model.lrpscale_image_size, mean, std)
    out["shard"] = np.zeros(IMAGES, np.int32)
    return out


def _actor(**analysis) -> AnalyzerActor:
    return AnalyzerActor("vgg16", "demo", AnalysisConfig(**analysis).to_dict(), device="cpu")


def _curves(rows) -> dict[str, dict[str, list]]:
    """{image_id: {order: logits by step}} of result rows."""
    out = {}
    for row in rows:
        for point in row["faithfulness"]:
            out.setdefault(row["image_id"], {}).setdefault(point["order"], []).append(point["logit"])
    return out


def test_every_image_of_a_full_sample_gets_the_engines_curves(batch):
    """faithfulness_sample 1: each image's stored curves equal region_perturbation of its LRP
    heatmap, computed here from the explainer with the image's own seed."""
    rows = _actor(faithfulness_sample=1.0).__call__(batch).to_pylist()
    stored = _curves(rows)
    assert set(stored) == {row["image_id"] for row in rows}
    model = load_model("vgg16", "demo")
    x = torch.from_numpy(np.stack(batch["pixels"]))
    heatmap = Explainer(model, "epsilon-gamma-box").explain(x, keep_layers=False).relevance
    seeds = torch.tensor([image_seed(0, str(i)) for i in batch["image_id"]])
    expected = region_perturbation(model, x, heatmap, None, steps=10, fraction=0.5, seed=seeds)
    for n, image_id in enumerate(batch["image_id"]):
        for order in ORDERS:
            assert len(stored[image_id][order]) == 11
            np.testing.assert_allclose(stored[image_id][order], expected.logits[order][n].numpy(), rtol=1e-4, atol=1e-4)
    points = rows[0]["faithfulness"]
    assert [p["step"] for p in points[:11]] == list(range(11))
    assert points[0]["fraction"] == 0.0 and points[10]["fraction"] == pytest.approx(0.5, abs=1e-3)


def test_a_sample_of_zero_perturbs_nothing(batch):
    rows = _actor(faithfulness_sample=0).__call__(batch).to_pylist()
    assert all(row["faithfulness"] == [] for row in rows)


def test_the_sample_is_drawn_per_image_id_whatever_the_batch(batch):
    """Half the images by the seeded draw of their ids; the same images with the same curves
    when each is analysed alone (a retried or re-sharded image is sampled as before)."""
    actor = _actor(faithfulness_sample=0.5, faithfulness_seed=3)
    together = _curves(actor(batch).to_pylist())
    expected = {str(i) for i in batch["image_id"] if in_sample(3, str(i), 0.5)}
    assert set(together) == expected and 0 < len(expected) < IMAGES
    for n in range(IMAGES):
        alone = _curves(actor({key: value[n:n + 1] for key, value in batch.items()}).to_pylist())
        image_id = str(batch["image_id"][n])
        assert set(alone) == ({image_id} & expected)
        for order in alone.get(image_id, {}):
            np.testing.assert_allclose(alone[image_id][order], together[image_id][order], rtol=1e-4, atol=1e-4)


def test_a_share_draws_about_that_share_of_many_ids():
    drawn = sum(in_sample(0, f"class/{i:05d}.png", 0.04) for i in range(20000))
    assert abs(drawn / 20000 - 0.04) < 0.006  # binomial sd 0.0014
