"""``lrpscale.explain_image``: one image explained as a library call, the same numbers the
engine gives, and errors that name the bad argument."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import lrpscale
from lrpscale.config import AnalysisConfig
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.explain import ExplainError
from lrpscale.inputs.preprocess import preprocess


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("digit") / "3" / "0003.png"
    path.parent.mkdir()
    Image.fromarray((load_digits().images[3] * 16).astype(np.uint8), "L").save(path)
    return path


def test_explain_image_equals_the_analyzer_on_the_same_input(digit, tmp_path):
    result = lrpscale.explain_image(digit, weights="demo", ks=(1, 4, 16), deconv=1)
    record = json.loads(result.to_json())
    model = load_model("vgg16", "demo")
    pixels = torch.from_numpy(preprocess(Image.open(digit), 32, *input_normalization(model)))[None]
    analysis = Analyzer(model, AnalysisConfig.from_mapping(record["config"]))(pixels)
    assert record["prediction"]["index"] == int(analysis.logits[0].argmax())
    assert record["prediction"]["name"] == "3" and record["image_size"] == 32
    (layer, sweep), = analysis.sweeps.items()
    assert record["sweeps"][layer]["chosen_k"] == int(sweep.chosen_k[0]) and record["sweeps"][layer]["ks"] == [1, 4, 16]
    np.testing.assert_allclose(result.analysis.heatmap.numpy(), analysis.heatmap.numpy(), rtol=1e-5, atol=1e-7)
    files = result.save(tmp_path)
    assert sorted(files) == ["explanation", "graph", "heatmap", "json"]
    assert all(path.is_file() for path in files.values())
    assert json.loads(files["json"].read_text())["files"]["heatmap"] == str(files["heatmap"])


@pytest.mark.parametrize("arguments, message", [
    ({"image": "missing.png"}, "missing.png does not exist"),
    ({"layers": ["conv9_9"]}, "unknown layer 'conv9_9'"),
    ({"composite": "lrp"}, "lrp"),
    ({"target": "99"}, "out of range"),
    ({"ks": [0, 4]}, "must be positive"),
])
def test_bad_arguments_name_themselves(digit, arguments, message):
    arguments = {"image": digit, "weights": "demo", **arguments}
    with pytest.raises(ExplainError, match=message):
        lrpscale.explain_image(arguments.pop("image"), **arguments)
