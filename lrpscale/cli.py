"""The ``lrpscale`` command: a registry of subcommands, each a pair of functions.

Adding a subcommand is writing ``<name>_arguments(parser)`` (adds its options) and
``<name>(args) -> int`` (runs it, returns the exit code), then one ``register(...)`` line. Bad
input is reported as one line on stderr with exit code 2: raise ``CommandError`` (or let a
``WeightsError`` through) with a message that names the input and what to do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .analyze import AnalysisConfig, Analyzer
from .lrp import COMPOSITES, Explainer, get_composite
from .models import (VGG_NAMES, WeightsError, demo_spec, input_normalization, layer_aliases, load_model,
                     resolve_layer)
from .paths import default_path_layers
from .preprocess import preprocess

# matplotlib (viz) and pandas/pyarrow (data) load inside the functions that use them, so that
# `lrpscale --help` and subcommands that draw nothing start faster

USAGE_ERROR = 2


class CommandError(Exception):
    """Bad input to a subcommand; main prints its message as one line and exits with code 2."""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its one-line help, the function adding its options and the one running it."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Make ``lrpscale <name>`` available."""
    SUBCOMMANDS[name] = Subcommand(help, arguments, run)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lrpscale`` parser with every registered subcommand."""
    parser = _Parser(prog="lrpscale", description="Layer-wise Relevance Propagation for VGG classifiers: "
                     "critical neurons, critical paths and deconvolutions, from one image to whole datasets.")
    parser.add_argument("--version", action="version", version=f"lrpscale {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, subcommand in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=subcommand.help, description=subcommand.help)
        subcommand.arguments(sub)
        sub.set_defaults(handler=subcommand.run)  # not `run`: a subcommand may take an argument named run
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lrpscale`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return int(stop.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return args.handler(args)
    except (CommandError, WeightsError) as error:
        print(f"lrpscale {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# --- explain -----------------------------------------------------------------------------------

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)


def explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file PIL can read")
    parser.add_argument("--model", default="vgg16", choices=VGG_NAMES, help="VGG architecture (default vgg16)")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (needs network), demo[-DATASET] (the bundled demo models), random, "
                             "or a path to a state dict (default imagenet)")
    parser.add_argument("--out", default=".", type=Path, help="output folder (default: the current one)")
    parser.add_argument("--composite", default="epsilon-gamma-box",
                        help=f"LRP composite: {', '.join(COMPOSITES)} (default epsilon-gamma-box)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the square model input (default: the demo model's size, else 224)")
    parser.add_argument("--target", default="pred",
                        help="class to explain: pred (the prediction), label (the image's folder name as a "
                             "class name), a class index or a class name (default pred)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="layers whose k is swept, by name or alias (default: the last conv layer)")
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), metavar="K",
                        help=f"the k sweep (default {' '.join(map(str, DEFAULT_KS))})")
    parser.add_argument("--path-layers", nargs="+", default=None, metavar="LAYER",
                        help="critical-path layers (default: the last conv of each block, fc6, fc7)")
    parser.add_argument("--path-k", type=int, default=4, help="neurons kept at path layers that are not swept")
    parser.add_argument("--score-target", type=float, default=50.0,
                        help="k* is the smallest k whose fidelity SMAPE (%%) is at most this (default 50)")
    parser.add_argument("--deconv", type=int, default=4, metavar="J",
                        help="neurons reconstructed by deconvolution in every conv path layer (default 4)")
    parser.add_argument("--deconv-mode", default="all", choices=("all", "max"),
                        help="deconvolve the whole feature map or only its strongest activation")
    parser.add_argument("--classes", type=Path, default=None,
                        help="class names: a text file with one name per line or a JSON list "
                             "(default: the model's own, ImageNet's for imagenet weights, else indices)")
    parser.add_argument("--device", default="auto",
                        help="torch device to analyse on: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dpi", type=int, default=130, help="resolution of the PNG files (default 130)")


def explain(args: argparse.Namespace) -> int:
    """Explain one image: write the figure, heatmap, graph (PNG) and the numbers (JSON) to --out.

    ``<stem>.json`` holds: image, model, model_id, weights, composite, image_size, device, config (the
    AnalysisConfig), prediction and target ({index, name, probability, logit}), top_classes,
    conservation_error, relevance ({total, positive, negative}), layer_labels (module name ->
    alias), sweeps ({layer: {alias, ks, chosen_k, scores: {variant: {mse, smape}}}}), selected
    ({layer: [{neuron, rank, relevance, activation}]}), path_layers, nodes, edges, deconv
    ({layer: [neurons]}) and files (the PNGs written).
    """
    image_path = Path(args.image)
    image = read_image(image_path)  # before the model loads: a wrong path should fail at once
    _check_arguments(args)
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create output folder {out}: {error.strerror or error}") from None
    device = _device(args.device)
    model = _load_model(args.model, args.weights).to(device)
    names = class_names(model, args.classes)
    target = _target_index(args.target, image_path, names, _num_classes(model))
    size = args.image_size or model.lrpscale_image_size
    _check_image_size(model, size)
    pixels, shown = model_input(image, model, size)
    labels = layer_labels(model)
    config = explain_config(model, args, size)
    try:
        analyzer = Analyzer(model, config)
    except (KeyError, ValueError) as error:
        raise CommandError(_message(error)) from None
    analysis = analyzer(torch.from_numpy(pixels)[None], None if target is None else torch.tensor([target]))

    from . import viz

    stem = image_path.stem
    files = {"explanation": out / f"{stem}_explanation.png", "heatmap": out / f"{stem}_heatmap.png",
             "graph": out / f"{stem}_graph.png", "json": out / f"{stem}.json"}
    figure = viz.explanation_figure(analysis, 0, shown, labels, names, config.score_target)
    viz.save_figure(figure, files["explanation"], args.dpi)
    title = viz.explanation_title(analysis, 0, names)
    viz.save_figure(viz.heatmap_figure(analysis.heatmap[0], shown, title=title), files["heatmap"], args.dpi)
    graph = viz.analysis_graph(analysis, 0)
    viz.save_figure(viz.path_graph_figure(graph, title=f"critical path: {title}", layer_labels=labels,
                                          class_names=names), files["graph"], args.dpi)
    summary = {"image": str(image_path.resolve()), "model": args.model,
               "model_id": getattr(model, "lrpscale_model_id", args.model), "weights": str(args.weights),
               "composite": config.composite, "image_size": size, "device": str(device),
               "config": config.to_dict(), **explanation_record(analysis, labels, names),
               "files": {kind: str(path) for kind, path in files.items()}}
    files["json"].write_text(json.dumps(summary, indent=1))
    _print_summary(summary)
    return 0


def explain_config(model, args: argparse.Namespace, size: int):
    """The AnalysisConfig ``lrpscale explain`` uses: the sweep and path of the arguments, and
    deconvolutions of up to ``--deconv`` neurons at every conv path layer, pictures at the input
    size ``size``."""
    composite = get_composite(args.composite).name
    try:
        sweep_layers = [resolve_layer(model, l) for l in args.layers] if args.layers else None
        path_layers = [resolve_layer(model, l) for l in args.path_layers] if args.path_layers else None
    except KeyError as error:
        raise CommandError(_message(error)) from None
    modules = dict(model.named_modules())
    if path_layers is None:
        path_layers = default_path_layers(Explainer(model, composite))
    convs = [l for l in dict.fromkeys(path_layers + (sweep_layers or []))
             if isinstance(modules.get(l), nn.Conv2d)]
    return AnalysisConfig(composite=composite, sweep_layers=sweep_layers, ks=tuple(sorted(set(args.ks))),
                          score_target=args.score_target, path_layers=path_layers, path_k=args.path_k,
                          deconv_layers=convs or None, deconv_per_layer=args.deconv,
                          deconv_mode=args.deconv_mode, heatmap_size=size, deconv_size=size,
                          target="pred" if args.target == "pred" else "label")


def explanation_record(analysis, labels: dict[str, str], names: list[str] | None, index: int = 0) -> dict:
    """The JSON-ready numbers of one image of a BatchAnalysis (see ``explain`` for the keys)."""
    from .viz import class_label

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


def _print_summary(summary: dict) -> None:
    prediction, target = summary["prediction"], summary["target"]
    print(f"predicted {prediction['name']} (p = {prediction['probability']:.3f})")
    if target["index"] != prediction["index"]:
        print(f"explained {target['name']} (p = {target['probability']:.3f})")
    print(f"conservation error {summary['conservation_error']:.2e}")
    for layer, result in summary["sweeps"].items():
        smape = result["scores"]["fidelity"]["smape"][result["ks"].index(result["chosen_k"])]
        print(f"{result['alias']}: k* = {result['chosen_k']} of {result['ks']} (fidelity SMAPE {smape:.1f}%)")
    for kind, path in summary["files"].items():
        print(f"{kind:>12}: {path}")


# --- helpers -------------------------------------------------------------------------------------

def _message(error: BaseException) -> str:
    """The text of an exception; KeyError's str() would add quotes."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _load_model(name: str, weights: str):
    return load_model(name, None if weights in ("random", "none") else weights)


def _device(name: str):
    """--device as a torch.device; CommandError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"unknown --device {name!r}: {error}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CommandError(f"--device {name}: no such CUDA device here; use --device cpu")
    return device


def _num_classes(model) -> int:
    return model.classifier[-1].out_features


def _check_image_size(model, size: int) -> None:
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.features)
    if size < 2 ** pools:
        raise CommandError(f"--image-size {size} is too small: this model halves the image {pools} times, "
                           f"so it needs at least {2 ** pools} pixels")


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks of ``explain`` options that need no model, so they fail before it loads."""
    if min(args.ks) < 1 or args.path_k < 1 or args.deconv < 1:
        raise CommandError("--ks, --path-k and --deconv must be positive")
    try:
        get_composite(args.composite)
    except KeyError as error:
        raise CommandError(_message(error)) from None


def read_image(path: Path):
    """Decode an image file into a PIL image; CommandError if it is missing or not a readable image."""
    from .data import InputError, decode

    if not path.is_file():
        raise CommandError(f"image {path} does not exist")
    try:
        return decode(path.read_bytes())
    except InputError as error:
        raise CommandError(f"cannot read image {path}: {error.message}") from None
    except OSError as error:
        raise CommandError(f"cannot read image {path}: {error.strerror}") from None


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
        raise CommandError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def _read_class_names(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as error:
        raise CommandError(f"cannot read class names from {path}: {error.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path} is not a JSON list of class names: {error}") from None
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
            raise CommandError(f"target {index} is out of range: the model has {num_classes} classes")
        return index
    if target == "label":
        raise CommandError(f"--target label takes the class from the image's folder name, but {value!r} is not "
                           "a class of this model; pass --target INDEX or a class name")
    raise CommandError(f"unknown target {target!r}: pass pred, label, a class index or a class name")


# --- run, reduce, demo ---------------------------------------------------------------------------

def _analysis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--composite", default="epsilon-gamma-box",
                        help=f"LRP composite: {', '.join(COMPOSITES)} (default epsilon-gamma-box)")
    parser.add_argument("--ks", default=None, help="the k sweep, comma separated (default 1,4,16,64)")
    parser.add_argument("--layers", default=None, help="swept layers, comma separated (default: the last conv)")
    parser.add_argument("--target", default="pred", choices=("pred", "label"), help="class to explain per image")
    parser.add_argument("--heatmap-size", type=int, default=56, help="side of the stored heatmaps (default 56)")


def _analysis_config(args: argparse.Namespace):
    options = {"composite": args.composite, "target": args.target, "heatmap_size": args.heatmap_size}
    if args.ks:
        try:
            options["ks"] = tuple(int(k) for k in args.ks.split(","))
        except ValueError:
            raise CommandError(f"--ks must be integers separated by commas, got {args.ks!r}") from None
    if args.layers:
        options["sweep_layers"] = tuple(args.layers.split(","))
    return AnalysisConfig(**options)


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="a folder of images, a manifest (CSV/Parquet with uri), "
                        "a Parquet dataset with image bytes, or WebDataset .tar shards (a glob)")
    parser.add_argument("--input-kind", default=None, choices=("folder", "manifest", "parquet", "webdataset"))
    parser.add_argument("--output", required=True, help="the run directory (created; resumed if it exists)")
    parser.add_argument("--model", default="vgg16", choices=VGG_NAMES)
    parser.add_argument("--weights", default="imagenet", help="imagenet, demo[-DATASET], random, or a state dict path")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's (224, demo 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256, help="images per commit (default 256)")
    parser.add_argument("--num-actors", type=int, default=None, help="default: one per GPU, else one")
    parser.add_argument("--actor-resources", type=_actor_resources, default=None, metavar="JSON",
                        help="what one analyser actor requests, a JSON object such as "
                        '\'{"resources": {"accel_slot": 1}, "num_cpus": 1}\' (default {"num_gpus": 1} with GPUs, '
                        'else {"num_cpus": 2}); with a custom resource the actor count defaults to the '
                        "cluster's total of it divided by the request")
    parser.add_argument("--address", default=None, help="Ray cluster address (default RAY_ADDRESS, else local)")
    parser.add_argument("--overwrite", action="store_true", help="analyse again even if the run exists")
    parser.add_argument("--no-reduce", action="store_true", help="skip the reducer after the run")
    _analysis_arguments(parser)


def _actor_resources(text: str) -> dict:
    """--actor-resources: a JSON object of Ray resource requests (num_cpus, num_gpus, memory, resources)."""
    allowed = {"num_cpus", "num_gpus", "memory", "resources"}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict) or set(value) - allowed or not isinstance(value.get("resources", {}), dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object with keys from {sorted(allowed)}, 'resources' "
                                         f'a mapping such as {{"accel_slot": 1}}; got {text!r}')
    return value


def run(args: argparse.Namespace) -> int:
    """Audit a dataset into a run directory, then reduce it."""
    from .pipeline import RunConfig, run_audit
    from .reduce import reduce_run

    config = RunConfig(input=args.input, output=args.output, model=args.model,
                       weights=None if args.weights in ("random", "none") else args.weights,
                       input_kind=args.input_kind, image_size=args.image_size, batch_size=args.batch_size,
                       shard_size=args.shard_size, num_actors=args.num_actors,
                       actor_resources=args.actor_resources, analysis=_analysis_config(args))
    try:
        summary = run_audit(config, address=args.address, overwrite=args.overwrite)
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as error:
        raise CommandError(_message(error)) from None
    classes = None if args.no_reduce or summary.ok == 0 else reduce_run(summary.output)
    _print_run_summary(summary, classes)
    return 0


def _print_run_summary(summary, classes: Path | None) -> None:
    if not summary.already_complete:
        print(f"analysed {summary.analysed_now} inputs in {summary.seconds:.0f} s "
              f"({summary.images_per_second:.1f} img/s)")
    print(f"run {summary.run_id}: {summary.ok} images analysed, {summary.errors} errors")
    print(f"results: {summary.output}  (lrpscale.results.open_run or pandas.read_parquet of each table)")
    if summary.errors:
        print(f"errors:  {summary.output / 'errors'}")
    if classes is not None:
        print(f"classes: {classes}  (contact_sheet_label.png, graphs/, k_curves_*.png)")


def reduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("--top-nodes", type=int, default=8, help="neurons per layer in a class graph")
    parser.add_argument("--min-edge-frequency", type=float, default=0.1)
    parser.add_argument("--no-pictures", action="store_true")


def reduce(args: argparse.Namespace) -> int:
    """Class-level summaries of a run."""
    from .reduce import reduce_run

    if not (Path(args.run) / "run.json").is_file():
        raise CommandError(f"{args.run} is not an lrpscale run (no run.json)")
    try:
        out = reduce_run(args.run, args.top_nodes, args.min_edge_frequency, pictures=not args.no_pictures)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"classes: {out}")
    return 0


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", help="the earlier run directory")
    parser.add_argument("run_b", help="the later run directory")
    parser.add_argument("--output", type=Path, default=None,
                        help="where the comparison tables go (default RUN_B/compare-<name of RUN_A>)")
    parser.add_argument("--rows", type=int, default=10, help="classes and images listed in the printed summary")


def compare(args: argparse.Namespace) -> int:
    """How explanations moved between two runs: per class and per image, as Parquet and text."""
    from .compare import compare_runs

    for run in (args.run_a, args.run_b):
        if not (Path(run) / "run.json").is_file():
            raise CommandError(f"{run} is not an lrpscale run (no run.json)")
    try:
        comparison = compare_runs(args.run_a, args.run_b)
    except ValueError as error:
        raise CommandError(str(error)) from None
    out = comparison.write(args.output or Path(args.run_b) / f"compare-{Path(args.run_a).resolve().name}")
    print(comparison.text(args.rows), end="")
    print(f"comparison: {out}  (classes.parquet, images.parquet, summary.json, summary.md)")
    return 0


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory")
    parser.add_argument("--compare", default=None, metavar="OTHER",
                        help="an earlier run to compare with (run A; this run is B)")
    parser.add_argument("--output", type=Path, default=None, help="folder for report.html (default: the run directory)")
    parser.add_argument("--gallery", type=int, default=None, metavar="N",
                        help="classes pictured in the gallery; when the run has more, those with the lowest "
                        "accuracy (default 20)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="picture exactly these classes (true labels) in the gallery")
    parser.add_argument("--rows", type=int, default=None, metavar="N", help="rows of the longer tables (default 20)")


def report(args: argparse.Namespace) -> int:
    """One self-contained HTML page on a run (and its comparison with another)."""
    from .report import write_report

    for run in (args.run, args.compare):
        if run is not None and not (Path(run) / "run.json").is_file():
            raise CommandError(f"{run} is not an lrpscale run (no run.json)")
    if (args.gallery is not None and args.gallery < 1) or (args.rows is not None and args.rows < 1):
        raise CommandError("--gallery and --rows must be positive")
    options = {name: getattr(args, name) for name in ("gallery", "classes", "rows") if getattr(args, name) is not None}
    try:
        path = write_report(args.run, args.compare, args.output, **options)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"report: {path}")
    return 0


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="lrpscale-demo", type=Path, help="default ./lrpscale-demo")
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    parser.add_argument("--limit", type=int, default=None, help="fashion-mnist: only the first N images of each split (train and test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")


def demo(args: argparse.Namespace) -> int:
    """The embedded default: a real dataset, the bundled model, the audit and the reducer, locally."""
    from . import demo_data
    from .pipeline import RunConfig, run_audit
    from .reduce import reduce_run

    started = time.time()
    if args.dataset == "digits":
        source = demo_data.write_digits(args.output / "data")
        weights = "demo"
    else:
        try:
            source = demo_data.write_fashion_mnist(args.output / "data", limit=args.limit)
        except (FileNotFoundError, RuntimeError) as error:
            raise CommandError(str(error)) from None
        weights = "demo-fashion-mnist"
    spec = demo_spec(weights)
    print(f"dataset: {source} ({args.dataset}); model: bundled VGG16-topology demo model "
          f"(test accuracy {spec.test_accuracy:.1%})")
    summary = run_audit(RunConfig(input=str(source), output=str(args.output / "run"), weights=weights,
                                  batch_size=args.batch_size), overwrite=args.overwrite)
    classes = reduce_run(summary.output)
    _print_run_summary(summary, classes)
    print(f"pictures: {classes / 'contact_sheet_label.png'}, {classes / 'graphs'}")
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0


register("explain", "explain one image: heatmap, neurons across k, MSE/SMAPE, critical path, deconvolutions",
         explain_arguments, explain)
register("run", "audit a dataset on Ray: per-image results to Parquet, then the reducer", run_arguments, run)
register("reduce", "class-level graphs, summary heatmaps and k curves of a run", reduce_arguments, reduce)
register("compare", "compare two runs: accuracy, heatmap drift, critical-path overlap, k and SMAPE per class",
         compare_arguments, compare)
register("report", "one self-contained HTML page: summary, class gallery, worst-explained images, errors, "
         "comparison", report_arguments, report)
register("demo", "the embedded default: audit scikit-learn's digits with the bundled model", demo_arguments, demo)


if __name__ == "__main__":
    sys.exit(main())
