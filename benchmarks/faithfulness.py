"""Cost of region perturbation (lrpscale.engine.faithfulness) in LRP heatmaps, and against Quantus.

(a) cost: ``region_perturbation`` with its defaults (3 orders, 10 steps to half the patches) on a
    seeded random VGG16, per image, in units of one LRP heatmap (``Explainer.explain``, the
    epsilon-gamma-box composite) and of one forward pass, all measured in the same run.
(b) against Quantus 0.6 ``RegionPerturbation``: the same work, like for like: R single-patch
    steps in the MoRF order (Quantus's only step size), the same images, attributions, patch size
    and baseline 0, on the logit (``softmax=False``). The curves must agree; the speed-up is
    measured. For (a)'s settings Quantus would have to take every single-patch step up to the last
    one (T = round(fraction * patches) steps per order); that time is extrapolated from (b)'s
    measured cost per Quantus forward and printed as such, never as a measurement.

    python benchmarks/faithfulness.py [--images 2] [--size 224] [--patch-size 8] [--steps 10]
        [--fraction 0.5] [--quantus-regions 4] [--repeats 2] [--warmup 0] [--device cpu|cuda]
        [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
from lrp_throughput import (
    environment,
    forward,
    frozen_model,
    interleaved,
    paired_ratio,
    print_environment,
    random_images,
    synchronizer,
)

import lrpscale
from lrpscale.engine.faithfulness import copies_per_forward, patch_scores, region_perturbation, removal_counts

try:
    import quantus
except ImportError:  # (a) still runs without its peer
    quantus = None

Tensor = torch.Tensor


def quantus_region_perturbation(model, x: Tensor, target: Tensor, attributions: Tensor, patch_size: int,
                                regions: int) -> np.ndarray:
    """Quantus's metric as documented: (N, regions) curves f(x_0) - f(x_m) on the logit, MoRF, baseline 0."""
    metric = quantus.RegionPerturbation(patch_size=patch_size, order="morf", regions_evaluation=regions, abs=False,
                                        normalise=False, perturb_baseline=0.0, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curves = metric(model=model, x_batch=x.cpu().numpy(), y_batch=target.cpu().numpy(),
                        a_batch=attributions.cpu().numpy(), channel_first=True, softmax=False, device=str(x.device))
    return np.asarray(curves, dtype=np.float64)


def tie_free(attributions: Tensor) -> Tensor:
    """float64 attributions on a 2^-30 grid: patch sums exact in any order, so both rank alike."""
    a = attributions.double() / attributions.abs().amax((1, 2, 3), keepdim=True)
    return torch.round(a * 2.0 ** 30) / 2.0 ** 30


def best(seconds: list[float]) -> float:
    return min(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="images in the batch (default 2)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--patch-size", type=int, default=None, help="default: region_perturbation's, size // 28")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--quantus-regions", type=int, default=4, help="single-patch steps in (b) (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the best counts (default 2)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls per method first (default 0)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tf32", choices=["off", "on"], default="off", help="CUDA only (default off)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    device, model = frozen_model(args, parser)
    sync = synchronizer(device)
    n = args.images
    x = random_images(model, n, args.size, args.seed).to(device)
    explainer = lrpscale.Explainer(model, "epsilon-gamma-box")
    explanation = explainer.explain(x, keep_layers=False)
    target, attributions = explanation.target, explanation.relevance
    p = args.patch_size or max(1, args.size // 28)
    n_patches = patch_scores(attributions[:1], p).shape[1]
    counts = removal_counts(n_patches, args.steps, args.fraction)
    batch_size = copies_per_forward(model, x[:1])
    settings = {"model": f"{args.model} (random weights, seed {args.seed})", "size": args.size, "images": n,
                "patch_size": p, "patches": n_patches, "steps": args.steps, "fraction": args.fraction,
                "patches_removed": counts.tolist(), "orders": "morf,lerf,random", "copies_per_forward": batch_size,
                "quantus_regions": args.quantus_regions, "repeats": args.repeats, "warmup": args.warmup,
                "statistic": "best of repeats (median also shown)"}
    env = environment(device)
    env["quantus"] = getattr(quantus, "__version__", "installed") if quantus else "missing"
    print_environment(env, settings)

    # (a) region perturbation in heatmaps and forwards
    methods = {
        "forward (no_grad)": lambda: forward(model, x),
        "lrpscale explain (epsilon-gamma-box)": lambda: explainer.explain(x, keep_layers=False).relevance,
        "region_perturbation (3 orders)": lambda: region_perturbation(model, x, attributions, target, patch_size=p,
                                                                      steps=args.steps, fraction=args.fraction),
    }
    times, _ = interleaved(methods, args.repeats, args.warmup, sync)
    heatmap, one_forward = best(times["lrpscale explain (epsilon-gamma-box)"]), best(times["forward (no_grad)"])
    print(f"\n(a) cost per image, batch {n}")
    print(f"  {'method':<40} {'s/image':>9} {'median':>9} {'heatmaps':>9} {'forwards':>9}")
    rows = {}
    for name, seconds in times.items():
        per_image, median = best(seconds) / n, statistics.median(seconds) / n
        rows[name] = {"seconds": seconds, "per_image": per_image}
        print(f"  {name:<40} {per_image:9.3f} {median:9.3f} {best(seconds) / heatmap:9.2f} {best(seconds) / one_forward:9.2f}")
    perturbation = best(times["region_perturbation (3 orders)"])
    image_forwards = n * (1 + 3 * args.steps)
    paired = paired_ratio(times["region_perturbation (3 orders)"], times["lrpscale explain (epsilon-gamma-box)"])
    print(f"  region perturbation = {perturbation / heatmap:.2f} heatmaps per image-heatmap (paired median {paired:.2f}); "
          f"it runs {image_forwards} image forwards ({1 + 3 * args.steps} per image) in batches of {batch_size}")

    result = {"settings": settings, "environment": env, "cost": rows}
    if quantus is None:
        print("\nquantus is not importable: (b) is skipped")
    else:
        # (b) like for like: R single-patch MoRF steps, identical curves
        regions = args.quantus_regions
        a = tie_free(attributions)
        ours_fn = lambda: region_perturbation(model, x, a, target, patch_size=p, steps=regions,  # noqa: E731
                                              fraction=regions / n_patches, orders=("morf",))
        theirs_fn = lambda: quantus_region_perturbation(model, x, target, a, p, regions)  # noqa: E731
        times_b, outputs = interleaved({"lrpscale": ours_fn, "quantus": theirs_fn}, args.repeats, args.warmup, sync)
        ours_curve = outputs["lrpscale"].drop("morf").double().cpu().numpy()
        difference = float(np.abs(ours_curve - outputs["quantus"]).max())
        scale = float(outputs["lrpscale"].logits["morf"].abs().max())
        t_ours, t_quantus = best(times_b["lrpscale"]), best(times_b["quantus"])
        print(f"\n(b) like for like with Quantus {env['quantus']}: {regions} single-patch MoRF steps, {n} images, logit")
        print(f"  lrpscale region_perturbation  {t_ours:8.3f} s  (median {statistics.median(times_b['lrpscale']):.3f})")
        print(f"  quantus RegionPerturbation    {t_quantus:8.3f} s  (median {statistics.median(times_b['quantus']):.3f})")
        print(f"  speed-up {t_quantus / t_ours:.2f}x (paired median {paired_ratio(times_b['quantus'], times_b['lrpscale']):.2f}x); "
              f"max |curve difference| {difference:.2e} (largest |logit| {scale:.2f})")
        # Quantus runs 1 + R forwards of the N images per call: its cost per forward, then (a)'s work
        per_forward = t_quantus / (1 + regions)
        total = int(counts[-1])
        extrapolated = 3 * (1 + total) * per_forward
        print(f"  (a)'s settings in Quantus, extrapolated (not measured): 3 orders x {1 + total} forwards of {n} images "
              f"x {per_forward:.3f} s = {extrapolated:.1f} s, {extrapolated / perturbation:.1f}x lrpscale's measured "
              f"{perturbation:.1f} s (Quantus cannot take fewer, larger steps)")
        result["quantus"] = {"regions": regions, "seconds_lrpscale": times_b["lrpscale"], "seconds_quantus": times_b["quantus"],
                             "speedup": t_quantus / t_ours, "max_curve_difference": difference,
                             "extrapolated_default_seconds": extrapolated, "extrapolated_default_speedup": extrapolated / perturbation}
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {env['load_average_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
