"""The bundled demo models and the demo datasets they were trained on."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import lrpscale.demo_data
import lrpscale.engine.models
from lrpscale.demo_data import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    DatasetMissing,
    digits_arrays,
    digits_split,
    fashion_mnist,
    model_inputs,
    write_digits,
)
from lrpscale.engine.models import ASSETS, WeightsError, demo_models, file_sha256, load_model


@torch.no_grad()
def _accuracy(model, images: np.ndarray, labels: np.ndarray, size: int) -> float:
    """Top-1 accuracy on (N, H, W) uint8 images, preprocessed as the audit preprocesses files."""
    inputs = torch.from_numpy(model_inputs(images, size, model.lrpscale_mean, model.lrpscale_std))
    return (model(inputs).argmax(1).numpy() == labels).mean()


def test_manifest_lists_both_models_and_their_checksums_match():
    bundled = demo_models()
    assert set(bundled) == {"digits", "fashion-mnist", "clever-hans"}
    assert bundled["digits"].classes == DIGITS_CLASSES
    assert bundled["fashion-mnist"].classes == FASHION_MNIST_CLASSES
    for spec in bundled.values():
        path = ASSETS / spec.file
        assert file_sha256(path) == spec.sha256, f"{path} does not match the manifest; re-run the training script"
        assert path.stat().st_size < 4_000_000, f"{path} should stay a small demo file"
        assert spec.num_classes == len(spec.classes) == 10
        assert spec.mean[0] == spec.mean[1] == spec.mean[2]  # greyscale data


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = digits_split()
    _, labels = digits_arrays()
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test)
    assert np.all(np.abs(np.bincount(labels[test]) - 0.2 * np.bincount(labels)) <= 1)
    again_train, again_test = digits_split()
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


def test_demo_model_classifies_held_out_digits():
    model = load_model("vgg16", weights="demo")
    spec = demo_models()["digits"]
    images, labels = digits_arrays()
    _, test = digits_split()
    accuracy = _accuracy(model, images[test], labels[test], spec.image_size)
    assert accuracy >= 0.95
    # the manifest's number was measured the same way; one image either way is tolerated
    assert accuracy == pytest.approx(spec.test_accuracy, abs=1 / len(test) + 1e-4)
    assert model.lrpscale_model_id == f"vgg16:{spec.sha256}"


def test_tampered_demo_weights_are_refused(tmp_path, monkeypatch):
    assets = shutil.copytree(ASSETS, tmp_path / "assets")
    weights = assets / demo_models()["digits"].file
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(lrpscale.engine.models, "ASSETS", assets)
    with pytest.raises(WeightsError, match="expected sha256"):
        load_model("vgg16", weights="demo")


def test_unknown_demo_model_names_the_available_ones():
    with pytest.raises(WeightsError, match="demo-digits"):
        load_model("vgg16", weights="demo-cifar")


def test_write_digits_round_trips_every_pixel(tmp_path):
    from sklearn.datasets import load_digits

    folder = write_digits(tmp_path)
    assert folder == tmp_path / "digits"
    assert sorted(p.name for p in folder.iterdir()) == DIGITS_CLASSES
    files = sorted(folder.glob("*/*.png"))
    assert len(files) == 1797
    digits = load_digits()
    for path in files:
        index = int(path.stem)
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (8, 8)
            pixels = np.asarray(image)
        assert path.parent.name == str(digits.target[index])
        assert np.array_equal(np.rint(pixels * (16 / 255)), digits.images[index]), path
    # complete folders are left alone
    before = files[0].stat().st_mtime_ns
    write_digits(tmp_path)
    assert files[0].stat().st_mtime_ns == before


def test_fashion_demo_model_beats_chance(tmp_path_factory):
    try:
        test_set = fashion_mnist(tmp_path_factory.mktemp("fashion"), train=False, download=False)
    except DatasetMissing as missing:
        pytest.skip(str(missing))
    model = load_model("vgg16", weights="demo-fashion-mnist")
    size = demo_models()["fashion-mnist"].image_size
    images, labels = test_set.data[:200].numpy(), test_set.targets[:200].numpy()
    assert _accuracy(model, images, labels, size) >= 0.5  # chance is 0.1; the model reaches about 0.9


def test_missing_fashion_mnist_says_which_apt_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(lrpscale.demo_data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path, train=False, download=False)
