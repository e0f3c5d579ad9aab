"""Cost of neuron selection: the k sweep against zennit-crp's way, and the whole analysis in heatmaps.

(a) sweep: the conditional heatmaps H_l(k) of the top-k channels at one layer for every k. lrpscale
    runs one forward, one full backward pass (keeping the layer) and ``selection.sweep`` (all k as
    one batch of masks from the layer down). zennit-crp's way: a full zennit pass to rank the
    channels, then per k a fresh forward with the EpsilonGammaBox composite and a backward whose
    gradient at the layer's output is masked to the top-k channels by a tensor hook.
(b) analysis: ``Analyzer(model)(x)`` with the default ``AnalysisConfig``, in units of one plain
    heatmap (``explain(x, keep_layers=False)``) measured in the same run, with its stages.

    python benchmarks/selection_throughput.py [--parts sweep,analysis] [--batch-sizes 1]
        [--size 224] [--layer conv5_3] [--ks 1,2,4,8,16,32,64] [--repeats 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lrp_throughput import (
    environment,
    frozen_model,
    heatmap_difference,
    interleaved,
    paired_ratio,
    parse_ints,
    print_environment,
    random_images,
    synchronizer,
    zennit,
    zennit_composite,
)

import lrpscale
from lrpscale.config import AnalysisConfig
from lrpscale.engine import analyzer as analyzer_module
from lrpscale.engine.selection import neuron_totals, rank_neurons, sweep, top_k_masks

Tensor = torch.Tensor
TARGET_SWEEP = 5.0


def zennit_conditional(model: torch.nn.Module, composite, x: Tensor, layer: str, target: Tensor | None = None,
                       mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One zennit pass: (input relevance (N, 3, H, W), relevance at ``layer``'s output, target (N,)).

    mask: (N, C) 0/1 factors on the gradient at the layer's output, as zennit-crp conditions a
    heatmap on a set of channels. target: None for the prediction.
    """
    captured = {}

    def condition(grad):
        if mask is not None:
            grad = grad * mask.reshape(*mask.shape, *([1] * (grad.ndim - 2)))
        captured["relevance"] = grad
        return grad

    def attach(module, inputs, output):  # returns None: a forward hook's return value replaces the output
        output.register_hook(condition)

    x = x.detach().requires_grad_(True)
    with composite.context(model) as modified:
        # registered inside the context, so the hook sees the output zennit's own hook returned
        handle = dict(modified.named_modules())[layer].register_forward_hook(attach)
        try:
            out = modified(x)
            target = out.argmax(1) if target is None else target
            initial = torch.zeros_like(out)
            rows = torch.arange(len(x), device=x.device)
            initial[rows, target] = out[rows, target]
            relevance, = torch.autograd.grad(out, x, initial)
        finally:
            handle.remove()
    return relevance, captured["relevance"], target


def zennit_crp_sweep(model: torch.nn.Module, composite, x: Tensor, layer: str, ks: list[int],
                     clock: dict | None = None, sync: Callable[[], None] = lambda: None) -> tuple[Tensor, Tensor]:
    """zennit-crp's way: a full pass to rank, then one masked forward+backward per k.

    Returns (heatmaps (N, K, 3, H, W), top-k masks (N, K', C) of the k < C). clock gets the
    seconds of the full pass and of the conditional passes.
    """
    start = time.perf_counter()
    full, layer_relevance, target = zennit_conditional(model, composite, x, layer)
    relevance = neuron_totals(layer_relevance.detach())
    c = relevance.shape[1]
    partial = [k for k in ks if k < c]
    masks = top_k_masks(rank_neurons(relevance), partial)
    sync()
    middle = time.perf_counter()
    heatmaps = [zennit_conditional(model, composite, x, layer, target, masks[:, j])[0] for j in range(len(partial))]
    heatmaps += [full] * (len(ks) - len(partial))
    sync()
    if clock is not None:
        clock.setdefault("full pass", []).append(middle - start)
        clock.setdefault("conditional passes", []).append(time.perf_counter() - middle)
    return torch.stack(heatmaps, 1), masks


def lrpscale_sweep(explainer: lrpscale.Explainer, x: Tensor, layer: str, ks: list[int],
                   clock: dict | None = None, sync: Callable[[], None] = lambda: None):
    """lrpscale's way: forward, full backward keeping the layer, then all k as one batch."""
    start = time.perf_counter()
    record = explainer.forward(x)
    initial = explainer.initial_relevance(record, explainer.targets(record))
    heatmap, kept, _ = explainer.propagate(record, initial, keep=[layer])
    sync()
    middle = time.perf_counter()
    result = sweep(explainer, record, heatmap[:, 0], kept[explainer.resolve(layer)][:, 0], layer, ks)
    sync()
    if clock is not None:
        clock.setdefault("full pass", []).append(middle - start)
        clock.setdefault("sweep", []).append(time.perf_counter() - middle)
    return result


def measure_sweep(model, explainer, batch: int, args, device) -> dict:
    sync = synchronizer(device)
    layer = explainer.resolve(args.layer)
    x = random_images(model, batch, args.size, args.seed + batch).to(device)
    ours_clock, theirs_clock = {}, {}
    composite = zennit_composite("epsilon-gamma-box", model, x.shape, device)
    methods = {"lrpscale": lambda: lrpscale_sweep(explainer, x, layer, args.ks, ours_clock, sync),
               "zennit-crp": lambda: zennit_crp_sweep(model, composite, x, layer, args.ks, theirs_clock, sync)}
    times, outputs = interleaved(methods, args.repeats, args.warmup, sync)
    ours, (theirs, their_masks) = outputs["lrpscale"], outputs["zennit-crp"]
    c = ours.relevance.shape[1]
    our_masks = top_k_masks(ours.order, [k for k in ours.ks if k < c])
    n, k = ours.heatmaps.shape[:2]
    difference = heatmap_difference(ours.heatmaps.reshape(n * k, -1), theirs.reshape(n * k, -1))
    # the clocks also saw the warm-up calls: keep the timed repeats
    stages = {f"lrpscale {name}": v[-args.repeats:] for name, v in ours_clock.items()}
    stages.update({f"zennit-crp {name}": v[-args.repeats:] for name, v in theirs_clock.items()})
    return {"batch": batch, "layer": layer, "ks": ours.ks, "seconds": times, "stages": stages,
            "same_top_k_sets": bool(torch.equal(our_masks.cpu(), their_masks.cpu())),
            "heatmap_difference": difference}


def report_sweep(result: dict) -> list[dict]:
    t, s = result["seconds"], result["stages"]
    best = {name: min(v) for name, v in {**t, **s}.items()}
    print(f"\n(a) k sweep at {result['layer']}, ks {result['ks']}, batch {result['batch']} "
          f"(seconds, best of repeats; median in brackets)")
    for name in ["lrpscale", "lrpscale full pass", "lrpscale sweep", "zennit-crp", "zennit-crp full pass",
                 "zennit-crp conditional passes"]:
        values = {**t, **s}[name]
        print(f"  {name:<32} {min(values):8.3f} s  ({statistics.median(values):.3f})  "
              f"{result['batch'] / min(values):8.3f} img/s")
    ratios = {
        "end to end (both: ranking pass + all k)": (best["zennit-crp"] / best["lrpscale"],
                                                    paired_ratio(t["zennit-crp"], t["lrpscale"])),
        "zennit-crp conditional passes / lrpscale end to end": (
            best["zennit-crp conditional passes"] / best["lrpscale"],
            paired_ratio(s["zennit-crp conditional passes"], t["lrpscale"])),
        "conditional heatmaps only (zennit passes / lrpscale sweep)": (
            best["zennit-crp conditional passes"] / best["lrpscale sweep"],
            paired_ratio(s["zennit-crp conditional passes"], s["lrpscale sweep"])),
    }
    print("  speed-up of lrpscale (best-of; paired median):")
    for name, (ratio, paired) in ratios.items():
        print(f"    {name:<58} {ratio:6.2f}x  ({paired:.2f}x)")
    print(f"  same top-k sets: {result['same_top_k_sets']}; max |lrpscale - zennit-crp| of normalised heatmaps "
          f"(each / its sum |values|), relative to the largest value: {result['heatmap_difference']:.2e}")
    strict = ratios["zennit-crp conditional passes / lrpscale end to end"][0]
    check = {"batch": result["batch"], "what": "sweep: zennit-crp conditional passes / lrpscale end to end",
             "target": TARGET_SWEEP, "ratio": strict, "passed": strict >= TARGET_SWEEP}
    print(f"  {'PASS' if check['passed'] else 'FAIL'}: {check['what']} = {strict:.2f}x (target >= {TARGET_SWEEP}x)")
    result["ratios"] = {name: {"best": r, "paired_median": p} for name, (r, p) in ratios.items()}
    return [check]


class StageClock:
    """Times calls of wrapped functions; a call made inside another timed call counts for the outer one."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.depth = 0
        self.current: dict[str, float] | None = None  # None: not inside run(), calls are not timed
        self.history: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.depth or self.current is None:
                return fn(*args, **kwargs)
            self.depth += 1
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
                self.depth -= 1
        return timed

    def run(self, fn: Callable):
        """Call fn, recording its stages and, under "total", its own time."""
        self.current = {}
        self.sync()
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.sync()
            self.current["total"] = time.perf_counter() - start
            self.history.append(self.current)
            self.current = None


class timed_stages:
    """Wrap the functions ``Analyzer.__call__`` calls, for the duration of a with block."""

    STAGES = {"sweep": "sweep", "critical path (edges)": "critical_path", "deconvolution": "deconvolve_many"}

    def __init__(self, analyzer: analyzer_module.Analyzer, clock: StageClock):
        self.analyzer, self.clock = analyzer, clock

    def __enter__(self):
        explainer = self.analyzer.explainer
        self.saved = {attribute: getattr(analyzer_module, attribute) for attribute in self.STAGES.values()}
        for name, attribute in self.STAGES.items():  # analyzer.py calls these through its module globals
            setattr(analyzer_module, attribute, self.clock.wrap(name, self.saved[attribute]))
        # instance attributes shadow the methods; nested calls (inside sweep, ...) count for the outer stage
        explainer.forward = self.clock.wrap("forward", type(explainer).forward.__get__(explainer))
        explainer.propagate = self.clock.wrap("full backward pass", type(explainer).propagate.__get__(explainer))
        return self

    def __exit__(self, *exc):
        for attribute, original in self.saved.items():
            setattr(analyzer_module, attribute, original)
        del self.analyzer.explainer.forward, self.analyzer.explainer.propagate


def measure_analysis(model, batch: int, args, device) -> dict:
    sync = synchronizer(device)
    analyzer = analyzer_module.Analyzer(model, AnalysisConfig())
    explainer = analyzer.explainer
    x = random_images(model, batch, args.size, args.seed + 100 + batch).to(device)
    clock = StageClock(sync)
    with timed_stages(analyzer, clock):
        methods = {"heatmap": lambda: explainer.explain(x, keep_layers=False).relevance,
                   "analysis": lambda: clock.run(lambda: analyzer(x))}
        times, outputs = interleaved(methods, args.repeats, args.warmup, sync)
    # the stages of the fastest timed analyzer call (history: warmups first)
    fastest = dict(min(clock.history[-args.repeats:], key=lambda h: h["total"]))
    fastest["other (targets, masks, bookkeeping)"] = fastest["total"] - sum(
        v for k, v in fastest.items() if k != "total")
    records = []  # turning results into Python rows, as a pipeline actor does; small, timed apart
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs["analysis"].records()
        records.append(time.perf_counter() - start)
    sweep_result = next(iter(outputs["analysis"].sweeps.values()))
    return {"batch": batch, "seconds": times, "stages": fastest,
            "records_seconds": records,
            "chosen_k": sweep_result.chosen_k.tolist(), "config": analyzer.config.to_dict()}


def report_analysis(result: dict) -> None:
    t = result["seconds"]
    heatmap = min(t["heatmap"])
    print(f"\n(b) whole analysis, batch {result['batch']}, default AnalysisConfig; chosen k per image "
          f"{result['chosen_k']} (seconds, best of repeats; median in brackets)")
    for name, values in t.items():
        print(f"  {name:<44} {min(values):8.3f} s  ({statistics.median(values):.3f})  "
              f"{result['batch'] / min(values):8.3f} img/s  {min(values) / heatmap:6.2f} heatmaps "
              f"(paired median {paired_ratio(values, t['heatmap']):.2f})")
    stages = dict(result["stages"])
    total = stages.pop("total")
    stages["records() (python rows, not in the total)"] = min(result["records_seconds"])
    print(f"  stages of the fastest analysis call ({total:.3f} s):")
    for name, seconds in stages.items():
        print(f"    {name:<42} {seconds:8.3f} s  {seconds / heatmap:6.2f} heatmaps")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="sweep,analysis", help="comma-separated: sweep, analysis")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layer", default="conv5_3", help="sweep layer (name or alias; default conv5_3)")
    parser.add_argument("--ks", type=parse_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tf32", choices=["off", "on"], default="off",
                        help="CUDA only: TF32 convolutions and matmuls (default off: FP32, as the Analyzer runs)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"sweep", "analysis"}:
        parser.error(f"unknown parts {sorted(unknown)}; choose from sweep, analysis")
    device, model = frozen_model(args, parser)
    settings = {"model": f"{args.model} (random weights, seed {args.seed})", "size": args.size,
                "batch_sizes": args.batch_sizes, "parts": parts, "layer": args.layer, "ks": args.ks,
                "composite": "epsilon-gamma-box", "repeats": args.repeats, "warmup": args.warmup,
                "statistic": "best of repeats (median also shown)"}
    env = environment(device)
    print_environment(env, settings)

    payload = {"settings": settings, "environment": env, "sweep": [], "analysis": [], "checks": []}

    def save():  # after every measurement too, so a run cut short keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2))
    if "sweep" in parts:
        if zennit is None:
            print("\n(a) skipped: zennit is not importable (it is the peer of the sweep)")
        else:
            explainer = lrpscale.Explainer(model, "epsilon-gamma-box")
            for batch in args.batch_sizes:
                result = measure_sweep(model, explainer, batch, args, device)
                payload["checks"] += report_sweep(result)
                payload["sweep"].append(result)
                save()
    if "analysis" in parts:
        for batch in args.batch_sizes:
            result = measure_analysis(model, batch, args, device)
            report_analysis(result)
            payload["analysis"].append(result)
            save()
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average at the end: {env['load_average_end']}")
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
