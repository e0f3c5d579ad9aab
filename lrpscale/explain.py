"""One image, explained: ``explain_image`` decodes the image, runs the whole per-image method on
it (docs/method.md) and returns an ``ImageExplanation`` whose ``to_json()`` holds the numbers
and whose ``save()`` writes the figures like the paper's. ``lrpscale explain`` calls it.

    result = lrpscale.explain_image("cat.png", weights="demo")
    result.prediction["name"], result.analysis.heatmap  # (1, 3, H, W)
    result.save("out/")                                 # out/cat_explanation.png, ... , out/cat.json
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lrpscale.config import AnalysisConfig, ConfigError
from lrpscale.engine import Explainer, devices, get_composite
from lrpscale.engine.analyzer import Analyzer, BatchAnalysis
from lrpscale.engine.critical_path import default_path_layers
from lrpscale.engine.models import input_normalization, layer_aliases, load_model, resolve_layer
from lrpscale.graph import class_label
from lrpscale.inputs.decoding import decode
from lrpscale.inputs.errors import InputError
from lrpscale.inputs.preprocess import preprocess
from lrpscale.locations import fetched


class ExplainError(ValueError):
    """A bad argument to ``explain_image``; the message names it and what to do."""


DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)


def explain_config(model, size: int, composite: str, layers, ks, path_layers, path_k: int, score_target: float,
                   deconv: int, deconv_mode: str, target: str) -> AnalysisConfig:
    """The AnalysisConfig of a single-image explanation: the given sweep and path, and
    deconvolutions of up to ``deconv`` neurons at every conv path layer, pictures at the input
    size ``size``."""
    try:
        sweep_layers = [resolve_layer(model, name) for name in layers] if layers else None
        path_layers = [resolve_layer(model, name) for name in path_layers] if path_layers else None
    except KeyError as error:
        raise ExplainError(_message(error)) from None
    modules = dict(model.named_modules())
    if path_layers is None:
        path_layers = default_path_layers(Explainer(model, composite))
    convs = [l for l in dict.fromkeys(path_layers + (sweep_layers or []))
             if isinstance(modules.get(l), nn.Conv2d)]
    try:
        return AnalysisConfig(composite=composite, sweep_layers=sweep_layers, ks=tuple(sorted(set(ks))),
                              score_target=score_target, path_layers=path_layers, path_k=path_k,
                              deconv_layers=convs or None, deconv_per_layer=deconv, deconv_mode=deconv_mode,
                              heatmap_size=size, deconv_size=size, target="pred" if target == "pred" else "label")
    except ConfigError as error:
        raise ExplainError(str(error)) from None


def explanation_record(analysis: BatchAnalysis, labels: dict[str, str], names: list[str] | None,
                       index: int = 0) -> dict:
    """The JSON-ready numbers of one image of a BatchAnalysis (see ``ImageExplanation`` for the keys)."""
    record = analysis.records()[index]
    probabilities = analysis.logits[index].softmax(0)
    top = probabilities.topk(min(5, probabilities.numel()))

    def described(cls: int) -> dict:
        return {"index": cls, "name": class_label(cls, names), "probability": float(probabilities[cls]),
                "logit": float(analysis.logits[index, cls])}

    sweeps = {}
    for layer, result in analysis.sweeps.items():
        sweeps[layer] = {"alias": labels.get(layer, layer), "ks": list(result.ks),
                         "chosen_k": int(result.chosen_k[index]),
                         "scores": {variant: {"mse": mse_values[index].tolist(), "smape": smape_values[index].tolist()}
                                    for variant, (mse_values, smape_values) in result.scores.items()}}
    selected: dict[str, list] = {}
    for neuron in record["neurons"]:
        selected.setdefault(neuron["layer"], []).append({k: v for k, v in neuron.items() if k != "layer"})
    return {
        "prediction": described(record["pred"]),
        "target": described(record["target"]),
        "top_classes": [described(int(c)) for c in top.indices],
        "conservation_error": record["conservation_error"],
        "relevance": {"total": record["rel_total"], "positive": record["rel_pos"], "negative": record["rel_neg"]},
        "layer_labels": {layer: labels.get(layer, layer) for layer in analysis.path_layers + list(analysis.sweeps)},
        "sweeps": sweeps,
        "selected": selected,
        "path_layers": list(analysis.path_layers),
        "nodes": analysis.nodes[index],
        "edges": analysis.edges[index],
        "deconv": {layer: channels[index].tolist() for layer, (channels, _) in analysis.deconv.items()},
    }


def _message(error: BaseException) -> str:
    """The text of an exception; KeyError's str() would add quotes."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _load_model(name: str, weights: str | None):
    return load_model(name, None if weights in (None, "random", "none") else fetched(weights))


def _num_classes(model) -> int:
    return model.classifier[-1].out_features


def _check_image_size(model, size: int) -> None:
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.features)
    if size < 2 ** pools:
        raise ExplainError(f"image size {size} is too small: this model halves the image {pools} times, "
                           f"so it needs at least {2 ** pools} pixels")


def read_image(path: Path):
    """Decode an image file into a PIL image; ExplainError if it is missing or not a readable image."""
    if not path.is_file():
        raise ExplainError(f"image {path} does not exist")
    try:
        return decode(path.read_bytes())
    except InputError as error:
        raise ExplainError(f"cannot read image {path}: {error.message}") from None
    except OSError as error:
        raise ExplainError(f"cannot read image {path}: {error.strerror}") from None


def model_input(image, model, size: int):
    """A PIL image -> (model input (3, S, S) float32, display image (S, S, 3) uint8), normalised as
    the model expects."""
    mean, std = input_normalization(model)
    pixels = preprocess(image, size, mean, std)
    shown = np.clip((pixels.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)) * 255 + 0.5, 0, 255)
    return pixels, shown.astype(np.uint8)


def layer_labels(model) -> dict[str, str]:
    """Module name -> VGG alias (features.28 -> conv5_3) for labelling pictures."""
    return {name: alias for alias, name in layer_aliases(model).items()}


def class_names(model, classes_file: Path | None = None) -> list[str] | None:
    """The model's class names, or None (pictures and output then use indices).

    In order: ``--classes`` (one name per line, or a JSON list), then the model's
    ``lrpscale_classes`` (the demo models' and ImageNet's names, set by ``load_model``).
    """
    num_classes = _num_classes(model)
    names = None
    if classes_file is not None:
        names = _read_class_names(classes_file)
    elif getattr(model, "lrpscale_classes", None):
        names = list(model.lrpscale_classes)
    if names is not None and len(names) != num_classes:
        raise ExplainError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def _read_class_names(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ExplainError(f"cannot read class names from {path}: {error.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ExplainError(f"{path} is not a JSON list of class names: {error}") from None
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _target_index(target: str, image: Path, names: list[str] | None, num_classes: int) -> int | None:
    """--target as a class index, or None for the prediction."""
    if target == "pred":
        return None
    value = image.resolve().parent.name if target == "label" else target
    if names is not None and value in names:
        return names.index(value)
    if value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < num_classes:
            raise ExplainError(f"target {index} is out of range: the model has {num_classes} classes")
        return index
    if target == "label":
        raise ExplainError(f"--target label takes the class from the image's folder name, but {value!r} is not "
                           "a class of this model; pass --target INDEX or a class name")
    raise ExplainError(f"unknown target {target!r}: pass pred, label, a class index or a class name")



@dataclass
class ImageExplanation:
    """One explained image.

    analysis: the engine's BatchAnalysis of the one image (heatmap (1, 3, S, S), sweeps, selected
    neurons, nodes, edges, deconvolutions); shown: (S, S, 3) uint8, the model input as a picture;
    record: the JSON-ready numbers (keys: image, model, model_id, weights, composite, image_size,
    device, config, prediction and target ({index, name, probability, logit}), top_classes,
    conservation_error, relevance ({total, positive, negative}), layer_labels, sweeps ({layer:
    {alias, ks, chosen_k, scores: {variant: {mse, smape}}}}), selected ({layer: [{neuron, rank,
    relevance, activation}]}), path_layers, nodes, edges, deconv ({layer: [neurons]})).
    """

    image: Path
    analysis: BatchAnalysis
    shown: np.ndarray
    config: AnalysisConfig
    layer_labels: dict[str, str]
    class_names: list[str] | None
    record: dict = field(repr=False)

    @property
    def prediction(self) -> dict:
        return self.record["prediction"]

    def to_json(self) -> str:
        return json.dumps(self.record, indent=1)

    def save(self, out: str | Path, dpi: int = 130) -> dict[str, Path]:
        """Write ``<stem>_explanation.png``, ``_heatmap.png``, ``_graph.png`` and ``<stem>.json``
        into ``out``; returns the paths by kind."""
        from lrpscale.report import figures

        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExplainError(f"cannot create output folder {out}: {error.strerror or error}") from None
        stem = self.image.stem
        files = {"explanation": out / f"{stem}_explanation.png", "heatmap": out / f"{stem}_heatmap.png",
                 "graph": out / f"{stem}_graph.png", "json": out / f"{stem}.json"}
        names, labels = self.class_names, self.layer_labels
        figure = figures.explanation_figure(self.analysis, 0, self.shown, labels, names, self.config.score_target)
        figures.save_figure(figure, files["explanation"], dpi)
        title = figures.explanation_title(self.analysis, 0, names)
        figures.save_figure(figures.heatmap_figure(self.analysis.heatmap[0], self.shown, title=title),
                            files["heatmap"], dpi)
        graph = figures.analysis_graph(self.analysis, 0)
        figures.save_figure(figures.path_graph_figure(graph, title=f"critical path: {title}", layer_labels=labels,
                                                      class_names=names), files["graph"], dpi)
        self.record["files"] = {kind: str(path) for kind, path in files.items()}
        files["json"].write_text(self.to_json())
        return files


def explain_image(image: str | Path, *, model: str = "vgg16", weights: str | None = "imagenet",
                  composite: str = "epsilon-gamma-box", image_size: int | None = None, target: str = "pred",
                  layers: Sequence[str] | None = None, ks: Sequence[int] = DEFAULT_KS,
                  path_layers: Sequence[str] | None = None, path_k: int = 4, score_target: float = 50.0,
                  deconv: int = 4, deconv_mode: str = "all", classes: str | Path | None = None,
                  device: str = "auto") -> ImageExplanation:
    """Explain one image file with the whole per-image method.

    weights: imagenet, demo[-DATASET], random (or None), or a state dict path. target: pred,
    label (the image's folder name as a class name), a class index or a class name. layers:
    swept layers (names or aliases; default the last conv). ks: the sweep. path_layers/path_k:
    the critical path. deconv/deconv_mode: neurons reconstructed at every conv path layer.
    classes: a file of class names (one per line, or a JSON list). device: auto, cpu, cuda, ...
    Raises ExplainError (or the engine's WeightsError) naming a bad argument.
    """
    image_path = Path(image)
    picture = read_image(image_path)  # before the model loads: a wrong path should fail at once
    if min(ks) < 1 or path_k < 1 or deconv < 1:
        raise ExplainError("ks, path_k and deconv must be positive")
    try:
        composite = get_composite(composite).name
    except KeyError as error:
        raise ExplainError(_message(error)) from None
    try:
        torch_device = devices.torch_device(device)
    except ValueError as error:
        raise ExplainError(str(error)) from None
    net = _load_model(model, weights).to(torch_device)
    names = class_names(net, None if classes is None else Path(classes))
    target_index = _target_index(target, image_path, names, _num_classes(net))
    size = image_size or net.lrpscale_image_size
    _check_image_size(net, size)
    pixels, shown = model_input(picture, net, size)
    labels = layer_labels(net)
    config = explain_config(net, size, composite, layers, ks, path_layers, path_k, score_target, deconv,
                            deconv_mode, target)
    try:
        analyzer = Analyzer(net, config)
    except (KeyError, ValueError) as error:
        raise ExplainError(_message(error)) from None
    analysis = analyzer(torch.from_numpy(pixels)[None].to(torch_device),
                        None if target_index is None else torch.tensor([target_index], device=torch_device))
    record = {"image": str(image_path.resolve()), "model": model,
              "model_id": getattr(net, "lrpscale_model_id", model), "weights": str(weights),
              "composite": config.composite, "image_size": size, "device": str(torch_device),
              "config": config.to_dict(), **explanation_record(analysis, labels, names)}
    return ImageExplanation(image_path, analysis, shown, config, labels, names, record)
