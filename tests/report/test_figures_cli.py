"""The pictures (lrpscale.report.figures) and the ``lrpscale`` command (lrpscale.cli).

``lrpscale explain`` runs end to end on narrow random-weight VGGs saved to files, at 32-48 px,
on a real photo (scikit-learn's china.jpg, shrunk) and a real digit; the viz functions are also
driven with edge cases (all-zero heatmaps, a one-neuron graph, no deconvolutions).
"""
from __future__ import annotations

import argparse
import json

import networkx as nx
import numpy as np
import pytest
import torch
from PIL import Image

from lrpscale import __version__, cli
from lrpscale.config import AnalysisConfig
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import build_vgg, input_normalization, load_model
from lrpscale.graph import OUTPUT, path_graph
from lrpscale.inputs.preprocess import preprocess
from lrpscale.report import figures

JSON_KEYS = {"image", "model", "model_id", "weights", "composite", "image_size", "device", "config", "prediction",
             "target", "top_classes", "conservation_error", "relevance", "layer_labels", "sweeps", "selected",
             "path_layers", "nodes", "edges", "deconv", "files"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin-wait and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def narrow_weights(tmp_path_factory):
    """Random narrow VGG16 and VGG11 state dicts (10 classes) written with torch.save."""
    root = tmp_path_factory.mktemp("weights")
    paths = {}
    for name, divisor in (("vgg16", 8), ("vgg11", 16)):
        torch.manual_seed(0)
        paths[name] = root / f"{name}.pth"
        torch.save(build_vgg(name, 10, width_divisor=divisor, hidden=32, pooled_size=1).state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from sklearn.datasets import load_sample_image

    path = tmp_path_factory.mktemp("images") / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).resize((64, 48), Image.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    """The first "3" of scikit-learn's digits as an 8x8 PNG in a folder named 3."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = int(np.flatnonzero(digits.target == 3)[0])
    folder = tmp_path_factory.mktemp("digits") / "3"
    folder.mkdir()
    path = folder / "three.png"
    Image.fromarray(np.rint(digits.images[index] * 255 / 16).astype(np.uint8), "L").save(path)
    return path


def _explain(capsys, *argv):
    code = cli.main(["explain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_picture(path, min_width: int, min_height: int):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0, f"{path} is blank"


def test_explain_writes_figure_heatmap_graph_and_json(tmp_path, capsys, narrow_weights, photo):
    out = tmp_path / "out"
    argv = [photo, "--model", "vgg16", "--weights", narrow_weights["vgg16"], "--out", out, "--image-size", "32",
            "--dpi", "72"]
    code, printed, err = _explain(capsys, *argv)
    assert code == 0, err
    _assert_picture(out / "china_explanation.png", 1000, 700)
    _assert_picture(out / "china_heatmap.png", 500, 200)
    _assert_picture(out / "china_graph.png", 350, 200)
    summary = json.loads((out / "china.json").read_text())
    assert set(summary) == JSON_KEYS
    assert "k* =" in printed and str(out / "china_explanation.png") in printed

    # the same analysis, run here, gives the same prediction, chosen k and selected neurons
    model = load_model("vgg16", narrow_weights["vgg16"])
    pixels = preprocess(Image.open(photo), 32, *input_normalization(model))
    analysis = Analyzer(model, AnalysisConfig.from_mapping(summary["config"]))(torch.from_numpy(pixels)[None])
    assert summary["prediction"]["index"] == int(analysis.logits[0].argmax()) == summary["target"]["index"]
    assert summary["image_size"] == 32 and summary["config"]["deconv_size"] == 32
    (layer, result), = analysis.sweeps.items()
    assert layer == "features.28" and summary["layer_labels"][layer] == "conv5_3"
    assert summary["sweeps"][layer]["chosen_k"] == int(result.chosen_k[0])
    assert summary["sweeps"][layer]["ks"] == result.ks
    assert [n["neuron"] for n in summary["selected"][layer]] == result.order[0, :int(result.chosen_k[0])].tolist()
    # k* follows the rule: the smallest k with fidelity SMAPE <= target, else the largest
    smapes = summary["sweeps"][layer]["scores"]["fidelity"]["smape"]
    reached = [k for k, value in zip(result.ks, smapes) if value <= summary["config"]["score_target"]]
    assert summary["sweeps"][layer]["chosen_k"] == (reached[0] if reached else result.ks[-1])
    assert summary["conservation_error"] == pytest.approx(float(analysis.conservation_error[0]), rel=1e-4)
    assert set(summary["deconv"]) == {l for l in summary["path_layers"] if l.startswith("features.")}
    assert summary["edges"] and all(e["layer_to"] in summary["path_layers"] + [OUTPUT] for e in summary["edges"])


def test_explain_digit_with_label_target_class_names_and_options(tmp_path, capsys, narrow_weights, digit):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    out = tmp_path / "out"
    code, printed, err = _explain(capsys, digit, "--model", "vgg11", "--weights", narrow_weights["vgg11"],
                                  "--out", out, "--image-size", "32", "--target", "3", "--classes", names,
                                  "--layers", "conv4_2", "conv3_2", "--ks", "1", "4", "16", "--deconv", "2",
                                  "--composite", "epsilon_plus_flat", "--dpi", "72")
    assert code == 0, err
    summary = json.loads((out / "three.json").read_text())
    assert summary["target"]["index"] == 3 and summary["target"]["name"] == "digit-3 (3)"
    assert summary["composite"] == "epsilon-plus-flat"
    assert set(summary["sweeps"]) == {"features.13", "features.8"}
    assert all(s["ks"] == [1, 4, 16] for s in summary["sweeps"].values())
    assert all(len(neurons) == 2 for neurons in summary["deconv"].values())
    _assert_picture(out / "three_explanation.png", 1000, 700)

    # --target label reads the class from the folder name "3", also without class names
    code, _, err = _explain(capsys, digit, "--model", "vgg11", "--weights", narrow_weights["vgg11"],
                            "--out", out, "--image-size", "32", "--target", "label", "--dpi", "50")
    assert code == 0, err
    assert json.loads((out / "three.json").read_text())["target"]["index"] == 3


def _one_line_error(code: int, err: str, *words: str):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, capsys, narrow_weights, photo):
    weights = narrow_weights["vgg16"]
    code, _, err = _explain(capsys, tmp_path / "missing.png", "--weights", weights, "--out", tmp_path)
    _one_line_error(code, err, "missing.png", "does not exist")

    corrupt = tmp_path / "corrupt.pth"  # a torch file cut in half, as an interrupted copy leaves it
    data = weights.read_bytes()
    corrupt.write_bytes(data[:len(data) // 2])
    code, _, err = _explain(capsys, photo, "--weights", corrupt, "--out", tmp_path)
    _one_line_error(code, err, "corrupt.pth")

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    code, _, err = _explain(capsys, not_an_image, "--weights", weights, "--out", tmp_path, "--image-size", "32")
    _one_line_error(code, err, "notes.png")

    for options, words in ((["--layers", "conv9_9"], ["conv9_9"]),
                           (["--target", "12"], ["out of range"]),
                           (["--target", "label"], ["folder name"]),
                           (["--composite", "nope"], ["nope"]),
                           (["--image-size", "16"], ["too small"]),
                           (["--model", "resnet50"], ["invalid choice"]),
                           (["--ks", "0"], ["positive"]),
                           (["--device", "cuda:99"], ["cuda:99"])):
        code, _, err = _explain(capsys, photo, "--weights", weights, "--out", tmp_path, "--image-size", "32",
                                *options)
        _one_line_error(code, err, *words)
    assert not list(tmp_path.glob("china*"))


def test_version_help_and_dispatch(capsys, monkeypatch):
    assert cli.main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().err

    def hello_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name")

    def hello(args: argparse.Namespace) -> int:
        if args.name == "bad":
            raise cli.CommandError("bad name")
        print(f"hello {args.name}")
        return 0

    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", cli.Subcommand("say hello", hello_arguments, hello))
    assert cli.main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert cli.main(["hello", "bad"]) == 2
    assert capsys.readouterr().err == "lrpscale hello: error: bad name\n"


# --- viz ---------------------------------------------------------------------------------------


def _png_pixels(fig) -> np.ndarray:
    data = figures.figure_png(fig, dpi=60)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_symmetric_limit_and_colours():
    assert figures.symmetric_limit(np.zeros((4, 4))) == 1.0
    assert figures.symmetric_limit(np.array([np.nan, -2.0, 1.0]), percentile=100) == 2.0
    values = np.zeros((3, 5, 5), np.float32)
    values[0, 0, 0], values[0, 4, 4] = 1.0, -1.0
    rgb = figures.heatmap_rgb(values, limit=1.0)
    assert rgb.shape == (5, 5, 3)
    assert np.allclose(rgb[2, 2], 1.0, atol=0.01)  # zero relevance is white in bwr
    assert rgb[0, 0, 0] > 0.9 and rgb[0, 0, 2] < 0.1 and rgb[4, 4, 2] > 0.9 and rgb[4, 4, 0] < 0.1
    grey = np.full((5, 5, 3), 0.5, np.float32)
    overlay = figures.heatmap_rgb(values, limit=1.0, image=grey)
    assert np.allclose(overlay[2, 2], 0.5) and overlay[0, 0, 0] > 0.9


def test_display_and_deconvolution_normalisation():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = (np.full((3, 4, 4), 0.75, np.float32) - 0.5) / 0.25
    assert np.allclose(figures.display_image(x, mean, std), 0.75)
    assert figures.display_image(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)
    picture = np.random.default_rng(0).normal(size=(3, 6, 6))
    shown = figures.normalize_picture(picture)
    assert shown.shape == (6, 6, 3) and shown.min() == 0.0 and shown.max() == pytest.approx(1.0)
    assert np.all(figures.normalize_picture(np.zeros((3, 6, 6))) == 0.5)


def test_all_zero_heatmaps_draw():
    zero = torch.zeros(3, 16, 16)
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert _png_pixels(figures.heatmap_figure(zero, image, title="zero")).std() > 0
    assert _png_pixels(figures.heatmap_figure(zero)).std() > 0
    assert _png_pixels(figures.restricted_heatmaps_figure(torch.zeros(3, 3, 16, 16), [1, 2, 4], chosen_k=2)).std() > 0
    sheet = figures.contact_sheet(np.zeros((5, 8, 8)), titles=[f"class {i}" for i in range(5)], shared_limit=True)
    assert _png_pixels(sheet).std() > 0
    assert _png_pixels(figures.contact_sheet([np.ones((8, 8)), -np.ones((12, 12))], titles=["a", "b"])).std() > 0


def test_score_curves_single_image_and_many():
    ks = [1, 2, 4, 8]
    one = {"fidelity": (np.array([1e-3, 1e-4, 1e-5, 0.0]), np.array([150.0, 80.0, 40.0, 0.0])),
           "forward_backward": (np.zeros(4), np.array([0.0, 10.0, 20.0, 30.0]))}
    fig = figures.score_curves_figure(ks, one, chosen_k=4, score_target=50.0, title="one image")
    ax_mse, ax_smape = fig.axes
    assert ax_mse.get_xscale() == "log" and ax_mse.get_yscale() == "log"
    assert _png_pixels(fig).std() > 0
    many = {"fidelity": (np.random.default_rng(0).random((6, 4)), np.random.default_rng(1).random((6, 4)) * 200)}
    assert _png_pixels(figures.score_curves_figure(ks, many)).std() > 0
    zeros = {"fidelity": (np.zeros(4), np.zeros(4))}
    assert _png_pixels(figures.score_curves_figure(ks, zeros, chosen_k=1)).std() > 0


def test_path_graph_edge_cases():
    single = path_graph([{"layer": "features.28", "neuron": 7, "rank": 0, "relevance": 0.0, "activation": 1.0}], [])
    assert _png_pixels(figures.path_graph_figure(single, layer_labels={"features.28": "conv5_3"})).std() > 0
    assert _png_pixels(figures.path_graph_figure(nx.DiGraph(), title="empty")).std() > 0
    nodes = [{"layer": "classifier.3", "neuron": 5, "rank": 0, "relevance": -2.0, "activation": 1.0},
             {"layer": OUTPUT, "neuron": 1, "rank": 0, "relevance": 3.0, "activation": 3.0}]
    edges = [{"layer_from": "classifier.3", "neuron_from": 5, "layer_to": OUTPUT, "neuron_to": 1, "relevance": -2.0}]
    graph = path_graph(nodes, edges)
    assert figures.graph_layers(graph) == ["classifier.3", OUTPUT]
    assert _png_pixels(figures.path_graph_figure(graph, class_names=["cat", "dog"])).std() > 0
    # a class graph with another size attribute and more neurons than shown per column
    wide = nx.DiGraph()
    for neuron in range(12):
        wide.add_node(("features.28", neuron), frequency=neuron / 12)
        wide.add_edge(("features.28", neuron), ("classifier.0", 0), frequency=0.5)
    wide.add_node(("classifier.0", 0), frequency=1.0)
    fig = figures.path_graph_figure(wide, size_attr="frequency", width_attr="frequency", max_per_layer=5)
    assert any("+7 more" in text.get_text() for text in fig.axes[0].texts)


def test_deconvolution_figure_edge_cases():
    pictures = {"features.7": (np.array([3]), np.zeros((1, 3, 8, 8))),
                "features.2": (np.array([1, 2]), np.random.default_rng(0).random((2, 3, 8, 8)))}
    fig = figures.deconvolution_figure(pictures, {"features.2": "conv1_2"})
    assert [ax.get_title() for ax in fig.axes] == ["conv1_2 #1", "#2", "features.7 #3"]
    assert _png_pixels(figures.deconvolution_figure({})).std() > 0


def test_save_figure_creates_folders(tmp_path):
    path = figures.save_figure(figures.heatmap_figure(np.eye(8)), tmp_path / "a" / "b.png")
    _assert_picture(path, 100, 100)


def test_explain_demo_weights_use_manifest_classes_and_size(tmp_path, capsys, monkeypatch, digit):
    """--weights demo: class names and the default image size come from the bundled manifest
    (here a stand-in manifest of a narrow random VGG16, so the test does not need the trained one)."""
    from dataclasses import asdict

    from lrpscale.engine import models

    assets = tmp_path / "assets"
    assets.mkdir()
    torch.manual_seed(0)
    torch.save(build_vgg("vgg16", 10, width_divisor=16, hidden=16, pooled_size=1).state_dict(), assets / "d.pth")
    spec = models.DemoWeights(file="d.pth", sha256=models.file_sha256(assets / "d.pth"),
                              classes=[f"n{i}" for i in range(10)], num_classes=10, width_divisor=16, hidden=16,
                              image_size=32, test_accuracy=0.0, mean=(0.1, 0.1, 0.1), std=(0.3, 0.3, 0.3))
    (assets / "demo_models.json").write_text(json.dumps({"digits": asdict(spec)}))
    monkeypatch.setattr(models, "ASSETS", assets)

    code, printed, err = _explain(capsys, digit, "--weights", "demo", "--out", tmp_path / "out", "--target", "label",
                                  "--ks", "1", "8", "--dpi", "50")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "three.json").read_text())
    assert summary["image_size"] == 32
    assert summary["target"]["name"] == "n3 (3)" and summary["prediction"]["name"].startswith("n")
    assert "predicted n" in printed
