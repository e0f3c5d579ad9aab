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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lrpscale import __version__
from lrpscale.config import COMPOSITE_NAMES, DECONV_MODES, INPUT_KINDS, MODEL_NAMES, TARGETS, ConfigError

# torch, Ray, matplotlib and pandas load inside the subcommands that use them, so that
# `lrpscale --help` and a bad setting answer at once

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
    from lrpscale.console import configure_logging

    configure_logging()
    try:
        return args.handler(args)
    except (CommandError, ConfigError) as error:
        print(f"lrpscale {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except ValueError as error:  # the engine's WeightsError and ExplainError are ValueErrors naming the input
        if type(error).__name__ not in ("WeightsError", "ExplainError"):
            raise
        print(f"lrpscale {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C: committed shards stay, the same command finishes the rest
        print("\ninterrupted: run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# --- explain -----------------------------------------------------------------------------------


def explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file PIL can read")
    parser.add_argument("--model", default="vgg16", choices=MODEL_NAMES, help="VGG architecture (default vgg16)")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (needs network), demo[-DATASET] (the bundled demo models), random, "
                             "or a path to a state dict (default imagenet)")
    parser.add_argument("--out", default=".", type=Path, help="output folder (default: the current one)")
    parser.add_argument("--composite", default="epsilon-gamma-box",
                        help=f"LRP composite: {', '.join(COMPOSITE_NAMES)} (default epsilon-gamma-box)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the square model input (default: the demo model's size, else 224)")
    parser.add_argument("--target", default="pred",
                        help="class to explain: pred (the prediction), label (the image's folder name as a "
                             "class name), a class index or a class name (default pred)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="layers whose k is swept, by name or alias (default: the last conv layer)")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64], metavar="K",
                        help="the k sweep (default 1 2 4 8 16 32 64)")
    parser.add_argument("--path-layers", nargs="+", default=None, metavar="LAYER",
                        help="critical-path layers (default: the last conv of each block, fc6, fc7)")
    parser.add_argument("--path-k", type=int, default=4, help="neurons kept at path layers that are not swept")
    parser.add_argument("--score-target", type=float, default=50.0,
                        help="k* is the smallest k whose fidelity SMAPE (%%) is at most this (default 50)")
    parser.add_argument("--deconv", type=int, default=4, metavar="J",
                        help="neurons reconstructed by deconvolution in every conv path layer (default 4)")
    parser.add_argument("--deconv-mode", default="all", choices=DECONV_MODES,
                        help="deconvolve the whole feature map or only its strongest activation")
    parser.add_argument("--classes", type=Path, default=None,
                        help="class names: a text file with one name per line or a JSON list "
                             "(default: the model's own, ImageNet's for imagenet weights, else indices)")
    parser.add_argument("--device", default="auto",
                        help="torch device to analyse on: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dpi", type=int, default=130, help="resolution of the PNG files (default 130)")


def explain(args: argparse.Namespace) -> int:
    """Explain one image: write the figure, heatmap, graph (PNG) and the numbers (JSON) to --out
    (``lrpscale.explain_image``; ``ImageExplanation`` lists the JSON keys)."""
    from lrpscale.explain import explain_image

    result = explain_image(args.image, model=args.model, weights=args.weights, composite=args.composite,
                           image_size=args.image_size, target=args.target, layers=args.layers, ks=args.ks,
                           path_layers=args.path_layers, path_k=args.path_k, score_target=args.score_target,
                           deconv=args.deconv, deconv_mode=args.deconv_mode, classes=args.classes,
                           device=args.device)
    result.save(args.out, args.dpi)
    _print_summary(result.record)
    return 0


def _print_summary(summary: dict) -> None:
    prediction, target = summary["prediction"], summary["target"]
    print(f"predicted {prediction['name']} (p = {prediction['probability']:.3f})")
    if target["index"] != prediction["index"]:
        print(f"explained {target['name']} (p = {target['probability']:.3f})")
    print(f"conservation error {summary['conservation_error']:.2e}")
    for result in summary["sweeps"].values():
        smape = result["scores"]["fidelity"]["smape"][result["ks"].index(result["chosen_k"])]
        print(f"{result['alias']}: k* = {result['chosen_k']} of {result['ks']} (fidelity SMAPE {smape:.1f}%)")
    for kind, path in summary["files"].items():
        print(f"{kind:>12}: {path}")


# --- run, reduce, demo ---------------------------------------------------------------------------

def _analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Named options for the most used analysis settings; ``--set analysis.KEY=VALUE`` reaches all."""
    parser.add_argument("--composite", default=None,
                        help=f"LRP composite: {', '.join(COMPOSITE_NAMES)} (default epsilon-gamma-box)")
    parser.add_argument("--ks", default=None, help="the k sweep, comma separated (default 1,4,16,64)")
    parser.add_argument("--layers", default=None, help="swept layers, comma separated (default: the last conv)")
    parser.add_argument("--target", default=None, choices=TARGETS, help="class to explain per image (default pred)")
    parser.add_argument("--heatmap-size", type=int, default=None, help="side of the stored heatmaps (default 56)")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, type=Path, metavar="YAML",
                        help="settings file (as jobs/configs/audit.yaml); named options and --set override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting, dotted for analysis.* (--set analysis.path_k=8), value read as YAML")


def run_config(args: argparse.Namespace):
    """The RunConfig of ``run``: the --config file, then the named options, then each --set; checked
    here, before anything starts. Weights default to imagenet; random or none mean random."""
    from lrpscale.config import RunConfig, load_settings

    named = {name: getattr(args, name) for name in ("input", "output", "model", "weights", "input_kind",
                                                     "image_size", "batch_size", "shard_size", "num_actors",
                                                     "actor_resources", "follow_external_links")}
    analysis = {"composite": args.composite, "target": args.target, "heatmap_size": args.heatmap_size,
                "ks": args.ks and f"[{args.ks}]", "sweep_layers": args.layers and f"[{args.layers}]"}
    sets = [f"analysis.{key}={value}" for key, value in analysis.items() if value is not None] + args.set
    settings = load_settings(args.config, named, sets)
    settings.setdefault("weights", "imagenet")
    if settings["weights"] in ("random", "none"):
        settings["weights"] = None
    return RunConfig.from_mapping(settings)


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default=None, help="a folder of images, a manifest (CSV/Parquet with uri), "
                        "a Parquet dataset with image bytes, or WebDataset .tar shards (a glob)")
    parser.add_argument("--input-kind", default=None, choices=INPUT_KINDS)
    parser.add_argument("--output", default=None, help="the run directory (created; resumed if it exists)")
    parser.add_argument("--model", default=None, choices=MODEL_NAMES, help="VGG architecture (default vgg16)")
    parser.add_argument("--weights", default=None,
                        help="imagenet (default), demo[-DATASET], random, or a state dict path")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's (224, demo 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default 16)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per commit (default 256)")
    parser.add_argument("--num-actors", type=int, default=None, help="default: one per GPU, else one")
    parser.add_argument("--actor-resources", type=_actor_resources, default=None, metavar="JSON",
                        help="what one analyser actor requests, a JSON object such as "
                        '\'{"resources": {"accel_slot": 1}, "num_cpus": 1}\' (default {"num_gpus": 1} with GPUs, '
                        'else {"num_cpus": 2}); with a custom resource the actor count defaults to the '
                        "cluster's total of it divided by the request")
    parser.add_argument("--follow-external-links", action="store_true", default=None,
                        help="follow symbolic links that lead out of the input folder (default: an error row each)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default RAY_ADDRESS, else local)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run at --output (only its own files)")
    parser.add_argument("--no-reduce", action="store_true", help="skip the reducer after the run")
    _analysis_arguments(parser)
    _config_arguments(parser)


def _actor_resources(text: str) -> dict:
    """--actor-resources: a JSON object (RunConfig checks its keys and amounts)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Audit a dataset into a run directory, then reduce it and draw the class pictures."""
    config = run_config(args)  # a bad setting fails here, before torch or Ray load

    from lrpscale.console import progress_display
    from lrpscale.report.class_pictures import reduce_with_pictures
    from lrpscale.run.audit import run_audit

    try:
        with progress_display() as progress:
            summary = run_audit(config, address=args.address, overwrite=args.overwrite, progress=progress)
    except (OSError, ValueError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    classes = None if args.no_reduce or summary.ok == 0 else reduce_with_pictures(summary.output)
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
    parser.add_argument("--no-strategies", action="store_true",
                        help="skip SpRAy's strategies per class (`lrpscale strategies` with its defaults, on Ray)")
    parser.add_argument("--no-references", action="store_true",
                        help="run the strategies without the reference images per neuron (no model is loaded)")


def reduce(args: argparse.Namespace) -> int:
    """Class-level summaries of a run, then (unless --no-strategies) its strategies per class."""
    from lrpscale.report.class_pictures import reduce_with_pictures

    _warn_if_incomplete(args.run)
    try:
        out = reduce_with_pictures(args.run, not args.no_pictures, top_nodes=args.top_nodes,
                                   min_edge_frequency=args.min_edge_frequency)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"classes: {out}")
    if not args.no_strategies:
        _print_strategies(_strategies(args.run, references=not args.no_references))
    return 0


def strategies_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory")
    parser.add_argument("--features", default="heatmap", choices=("heatmap", "channels"),
                        help="what images are compared by: the stored heatmap sum-pooled to at most 32x32 (default), "
                        "or the swept layer's relevance per channel")
    parser.add_argument("--cap", type=int, default=20000, metavar="N",
                        help="a class of more images is clustered on a seeded sample of N, the rest joins the nearest "
                        "cluster (default 20000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sample, k-means and t-SNE (default 0)")
    parser.add_argument("--k", type=int, default=10, metavar="K", help="nearest neighbours in the affinity graph (default 10)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the reference images of each cluster's distinguishing neurons (their channel-conditional "
                        "heatmaps, computed on the analyser actors)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default RAY_ADDRESS, else local)")


def strategies(args: argparse.Namespace) -> int:
    """SpRAy per class, by label and by prediction: one Ray task per class; tables into RUN/classes/."""
    _warn_if_incomplete(args.run)
    _print_strategies(_strategies(args.run, features=args.features, cap=args.cap, seed=args.seed, k=args.k,
                                  address=args.address, references=not args.no_references))
    return 0


def _strategies(run: str, **options):
    from lrpscale.run.strategies import run_strategies

    try:
        return run_strategies(run, **options)
    except (OSError, ValueError) as error:
        # a failed Ray task arrives as RayTaskError(ValueError): its cause is the one-line message
        raise CommandError(str(getattr(error, "cause", None) or error)) from None


def _print_strategies(summary) -> None:
    print(summary.text(), end="")
    print(f"strategies: {summary.location}  (strategy_classes.parquet: rank 1 = look here first; strategies.parquet, "
          f"strategy_clusters.parquet; {summary.seconds:.0f} s)")
    if summary.references is not None:
        print(summary.references.text(), end="")


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", help="the earlier run directory")
    parser.add_argument("run_b", help="the later run directory")
    parser.add_argument("--output", default=None,
                        help="where the comparison tables go, a folder or URI (default RUN_B/compare-<name of RUN_A>)")
    parser.add_argument("--rows", type=int, default=10, help="classes and images listed in the printed summary")


def compare(args: argparse.Namespace) -> int:
    """How explanations moved between two runs: per class and per image, as Parquet and text."""
    from lrpscale.results.comparison import compare_runs

    for run in (args.run_a, args.run_b):
        _check_run(run)
    try:
        comparison = compare_runs(args.run_a, args.run_b)
    except ValueError as error:
        raise CommandError(str(error)) from None
    from lrpscale.locations import child, name_of
    from lrpscale.storage.store import COMPARE_PREFIX

    out = comparison.write(args.output or child(args.run_b, f"{COMPARE_PREFIX}{name_of(args.run_a)}"))
    print(comparison.text(args.rows), end="")
    print(f"comparison: {out}  (classes.parquet, images.parquet, summary.json, summary.md)")
    return 0


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory")
    parser.add_argument("--compare", default=None, metavar="OTHER",
                        help="an earlier run to compare with (run A; this run is B)")
    parser.add_argument("--output", default=None, help="folder or URI for report.html (default: the run directory)")
    parser.add_argument("--gallery", type=int, default=None, metavar="N",
                        help="classes pictured in the gallery; when the run has more, those with the lowest "
                        "accuracy (default 20)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="picture exactly these classes (true labels) in the gallery")
    parser.add_argument("--rows", type=int, default=None, metavar="N", help="rows of the longer tables (default 20)")


def report(args: argparse.Namespace) -> int:
    """One self-contained HTML page on a run (and its comparison with another)."""
    from lrpscale.report.page import write_report

    _warn_if_incomplete(args.run)
    if args.compare is not None:
        _check_run(args.compare)
    if (args.gallery is not None and args.gallery < 1) or (args.rows is not None and args.rows < 1):
        raise CommandError("--gallery and --rows must be positive")
    options = {name: getattr(args, name) for name in ("gallery", "classes", "rows") if getattr(args, name) is not None}
    try:
        path = write_report(args.run, args.compare, args.output, **options)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"report: {path}")
    return 0


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory")
    parser.add_argument("--composites", "--methods", dest="methods", nargs="+", default=None, metavar="NAME",
                        help=f"LRP composites to evaluate: {', '.join(COMPOSITE_NAMES)} (default all four); "
                        "gradient and gradient_x_input are always added as baselines")
    parser.add_argument("--sample", type=int, default=64, metavar="N", help="images drawn from the run (default 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the sample, the random perturbation order and the random weights (default 0)")
    parser.add_argument("--steps", type=int, default=10, metavar="L",
                        help="region perturbation steps to half of the patches (default 10)")
    parser.add_argument("--cascade-sample", type=int, default=64, metavar="N",
                        help="images in the cascading randomisation, drawn as --sample's are (default 64; 0 skips it; "
                             "each costs layers + 1 heatmaps per method)")
    parser.add_argument("--mprt-sample", type=int, default=256, metavar="N",
                        help="images in eMPRT, drawn as --sample's are (default 256; 0 skips it; 2 heatmaps each per method)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")


def evaluate(args: argparse.Namespace) -> int:
    """Faithfulness (region perturbation) and randomisation checks of the LRP composites against
    gradient baselines, on a sample of a run; the tables go into RUN/evaluation/<settings id>/."""
    _check_run(args.run)
    from lrpscale.run.evaluation import evaluate_run

    try:
        evaluation = evaluate_run(args.run, methods=args.methods, sample=args.sample, seed=args.seed, steps=args.steps,
                                  cascade_sample=args.cascade_sample, mprt_sample=args.mprt_sample, device=args.device)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.4g}".format):
        print(evaluation.summary().to_string())
    images = evaluation.aopc["image_id"].nunique()
    best = evaluation.most_faithful
    print(f"most faithful composite: {best or 'none (no LRP composite evaluated)'}  "
          f"(largest mean MoRF - random AOPC over {images} images)")
    print(f"evaluation {evaluation.settings_id}: {evaluation.location}  "
          "(faithfulness.parquet, aopc.parquet, randomisation.parquet, settings.json, summary.json)")
    return 0


def _check_run(location: str) -> None:
    from lrpscale.storage.store import RunStore

    if not RunStore(location).is_file("run.json"):
        raise CommandError(f"{location} is not an lrpscale run (no run.json)")


def _warn_if_incomplete(location: str) -> None:
    """A reduce or report of an unfinished run works, and says so."""
    from lrpscale.results import Run

    _check_run(location)
    note = Run(location).incomplete_note()
    if note:
        print(f"warning: {note}", file=sys.stderr)


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="lrpscale-demo", type=Path, help="default ./lrpscale-demo")
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist", "clever-hans"),
                        help="clever-hans: the digits with a bright block planted on half of the 3s, and a model "
                        "trained on them (default digits)")
    parser.add_argument("--limit", type=int, default=None, help="fashion-mnist: only the first N images of each split (train and test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")


def demo(args: argparse.Namespace) -> int:
    """The embedded default: a real dataset, the bundled model, the audit and the reducer, locally."""
    from lrpscale import demo_data
    from lrpscale.config import RunConfig
    from lrpscale.console import progress_display
    from lrpscale.engine.models import demo_spec
    from lrpscale.report.class_pictures import reduce_with_pictures
    from lrpscale.run.audit import run_audit

    started = time.time()
    if args.dataset == "digits":
        source = demo_data.write_digits(args.output / "data")
        weights = "demo"
    elif args.dataset == demo_data.CLEVER_HANS:
        cue = demo_data.CLEVER_HANS_CUE
        source = demo_data.write_planted(args.output / "data", cue, demo_data.CLEVER_HANS)
        weights = f"demo-{demo_data.CLEVER_HANS}"
        print(f"planted cue: a {cue.size[0]}x{cue.size[1]} {cue.shape} (value {cue.intensity}) at {cue.position} of "
              f"the 8x8 digit, on {cue.fraction:.0%} of the {cue.cls}s (files *{demo_data.MARKED_SUFFIX}.png; "
              f"{source.parent / f'{demo_data.CLEVER_HANS}-marks.csv'})")
    else:
        try:
            source = demo_data.write_fashion_mnist(args.output / "data", limit=args.limit)
        except (FileNotFoundError, RuntimeError) as error:
            raise CommandError(str(error)) from None
        weights = "demo-fashion-mnist"
    spec = demo_spec(weights)
    print(f"dataset: {source} ({args.dataset}); model: bundled VGG16-topology demo model "
          f"(test accuracy {spec.test_accuracy:.1%})")
    with progress_display() as progress:
        summary = run_audit(RunConfig(input=str(source), output=str(args.output / "run"), weights=weights,
                                      batch_size=args.batch_size), overwrite=args.overwrite, progress=progress)
    classes = reduce_with_pictures(summary.output)
    _print_run_summary(summary, classes)
    print(f"pictures: {classes / 'contact_sheet_label.png'}, {classes / 'graphs'}")
    if args.dataset == demo_data.CLEVER_HANS:  # the point of this demo: the strategies and the report
        _print_strategies(_strategies(str(summary.output)))  # as `lrpscale reduce` does
        from lrpscale.report.page import write_report

        print(f"report: {write_report(summary.output)} (Strategies first: class {demo_data.CLEVER_HANS_CUE.cls} "
              "should be rank 1, its clusters the marked and the unmarked images)")
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0


register("explain", "explain one image: heatmap, neurons across k, MSE/SMAPE, critical path, deconvolutions",
         explain_arguments, explain)
register("run", "audit a dataset on Ray: per-image results to Parquet, then the reducer", run_arguments, run)
register("reduce", "class-level graphs, summary heatmaps, k curves and strategies of a run", reduce_arguments, reduce)
register("strategies", "SpRAy per class: the prediction strategies of each class as clusters of its heatmaps, "
         "ranked by how clearly a class splits", strategies_arguments, strategies)
register("compare", "compare two runs: accuracy, heatmap drift, critical-path overlap, k and SMAPE per class",
         compare_arguments, compare)
register("report", "one self-contained HTML page: summary, class gallery, worst-explained images, errors, "
         "comparison", report_arguments, report)
register("evaluate", "faithfulness and randomisation checks of the LRP composites against gradient baselines, "
         "on a sample of a run", evaluate_arguments, evaluate)
register("demo", "the embedded default: audit scikit-learn's digits with the bundled model", demo_arguments, demo)


if __name__ == "__main__":
    sys.exit(main())
