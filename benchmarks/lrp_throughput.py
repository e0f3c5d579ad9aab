"""LRP heatmap throughput (img/s) of lrpscale against zennit and plain autograd, in one run.

Every method sees the same seeded random VGG16 and the same inputs; methods are interleaved
across repeats so background load hits them alike, and the best repeat counts. Ratios are
against peers measured in this run, never against numbers from elsewhere.

    python benchmarks/lrp_throughput.py [--batch-sizes 1,8] [--size 224] [--repeats 3]
        [--device cpu|cuda] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lrpscale
from lrpscale.engine.analyzer import use_tf32
from lrpscale.engine.models import input_normalization

try:
    import zennit
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
except ImportError:  # the benchmark still measures lrpscale and autograd without its peer
    zennit = None

Tensor = torch.Tensor

# The project's targets on the 2-core CPU machine (benchmarks/README.md has the peers' numbers).
TARGET_VS_ZENNIT = 3.5
TARGET_VS_GRADIENT = 0.65


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce a number: versions, threads, hardware, load."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lrpscale": lrpscale.__version__,
        "zennit": getattr(zennit, "__version__", "installed") if zennit else "missing",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["NVIDIA_TF32_OVERRIDE"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
    return env


def print_environment(env: dict, settings: dict) -> None:
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def interleaved(methods: dict[str, Callable[[], object]], repeats: int, warmup: int,
                sync: Callable[[], None]) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per call of each method, repeats x, the order rotating each round.

    Returns ({name: [seconds per repeat]}, {name: output of its last call}).
    """
    outputs = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            outputs[name] = fn()
    sync()
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            outputs[name] = methods[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over repeats of slow/fast: each pair ran back to back, under the same load."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def normalized(relevance: Tensor) -> Tensor:
    """Each image's heatmap divided by its sum of |values|."""
    flat = relevance.detach().double().flatten(1)
    return flat / flat.abs().sum(1, keepdim=True).clamp(min=1e-300)


def heatmap_difference(ours: Tensor, theirs: Tensor) -> float:
    """max |ours - theirs| of the normalised heatmaps, relative to the largest |theirs|."""
    a, b = normalized(ours.cpu()), normalized(theirs.cpu())
    return float((a - b).abs().max() / b.abs().max())


def box_bounds(model: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(3,) normalised values of pixels 0 and 1 under the model's input normalisation."""
    mean, std = (torch.tensor(v) for v in input_normalization(model))
    return (0 - mean) / std, (1 - mean) / std


def random_images(model: torch.nn.Module, n: int, size: int, seed: int) -> Tensor:
    """(n, 3, size, size) uniform random pixels in [0, 1], normalised as the model expects."""
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in input_normalization(model))
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (pixels - mean) / std


def zennit_composite(name: str, model: torch.nn.Module, shape: torch.Size, device: torch.device):
    """zennit's composite of that name; box bounds expanded to the input shape, as zennit expects."""
    if name == "epsilon-gamma-box":
        low, high = (b.reshape(1, 3, 1, 1).expand(shape).to(device) for b in box_bounds(model))
        return EpsilonGammaBox(low=low, high=high)
    return {"epsilon-plus-flat": EpsilonPlusFlat}[name]()


def zennit_heatmap(model: torch.nn.Module, composite, x: Tensor) -> Tensor:
    """zennit's standard usage: gradient of the output, with the target logit as output gradient."""
    x = x.detach().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        one_hot = torch.zeros_like(out)
        rows = torch.arange(len(x), device=x.device)
        one_hot[rows, out.argmax(1)] = 1.0
        relevance, = torch.autograd.grad(out, x, one_hot * out)
    return relevance


def input_gradient(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Plain autograd: gradient of the predicted logit w.r.t. the input."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    rows = torch.arange(len(x), device=x.device)
    grad, = torch.autograd.grad(out[rows, out.argmax(1)].sum(), x)
    return grad


def forward(model: torch.nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


COMPOSITES = ("epsilon-gamma-box", "epsilon-plus-flat")
ZENNIT_NAMES = {"epsilon-gamma-box": "zennit EpsilonGammaBox", "epsilon-plus-flat": "zennit EpsilonPlusFlat"}


def measure(model: torch.nn.Module, explainers: dict[str, lrpscale.Explainer], batch: int, args,
            device: torch.device) -> tuple[list[dict], dict[str, float]]:
    """Rows (method, batch, seconds per repeat, img/s) and heatmap differences for one batch size."""
    x = random_images(model, batch, args.size, args.seed + batch).to(device)
    methods: dict[str, Callable[[], object]] = {
        "forward (no_grad)": lambda: forward(model, x),
        "plain input gradient": lambda: input_gradient(model, x),
    }
    for name in COMPOSITES:
        if zennit is not None:
            composite = zennit_composite(name, model, x.shape, device)
            methods[ZENNIT_NAMES[name]] = lambda c=composite: zennit_heatmap(model, c, x)
        methods[f"lrpscale {name}"] = lambda e=explainers[name]: e.explain(x, keep_layers=False).relevance
    times, outputs = interleaved(methods, args.repeats, args.warmup, synchronizer(device))
    if args.gradient_repeats:
        # the gradient comparison is the close one: more interleaved rounds of the cheap methods,
        # without zennit's (it is 4-10x slower and its comparison is far from its target)
        cheap = {name: call for name, call in methods.items() if name not in ZENNIT_NAMES.values()}
        extra, _ = interleaved(cheap, args.gradient_repeats, 0, synchronizer(device))
        for name, seconds in extra.items():
            times[name] = times[name] + seconds
    rows = []
    for method, seconds in times.items():
        rows.append({"method": method, "batch": batch, "seconds": seconds,
                     "img_s": batch / min(seconds), "median_img_s": batch / statistics.median(seconds)})
    differences = {}
    if zennit is not None:
        for name in COMPOSITES:
            differences[name] = heatmap_difference(outputs[f"lrpscale {name}"], outputs[ZENNIT_NAMES[name]])
    return rows, differences


def peer_of(method: str) -> str | None:
    for name in COMPOSITES:
        if method == f"lrpscale {name}":
            return ZENNIT_NAMES[name]
    return method if method in ZENNIT_NAMES.values() else None


TABLE_HEADER = f"{'method':<32} {'batch':>5} {'img/s':>9} {'median':>9} {'x zennit':>9} {'x gradient':>10}"


def print_rows(rows: list[dict]) -> None:
    """Table rows of one batch size (best-of-repeats img/s, median img/s, ratios)."""
    by_key = {(r["method"], r["batch"]): r for r in rows}
    for r in rows:
        peer = by_key.get((peer_of(r["method"]), r["batch"]))
        gradient = by_key[("plain input gradient", r["batch"])]
        vs_zennit = f"{r['img_s'] / peer['img_s']:9.2f}" if peer else f"{'':>9}"
        print(f"{r['method']:<32} {r['batch']:>5} {r['img_s']:>9.3f} {r['median_img_s']:>9.3f} {vs_zennit} "
              f"{r['img_s'] / gradient['img_s']:>10.2f}")


def target_checks(rows: list[dict]) -> list[dict]:
    """The project's throughput targets for lrpscale epsilon-gamma-box, per batch size."""
    by_key = {(r["method"], r["batch"]): r for r in rows}
    checks = []
    for batch in sorted({r["batch"] for r in rows}):
        ours = by_key[("lrpscale epsilon-gamma-box", batch)]
        peers = [("zennit EpsilonGammaBox", TARGET_VS_ZENNIT), ("plain input gradient", TARGET_VS_GRADIENT)]
        for peer_name, target in peers:
            peer = by_key.get((peer_name, batch))
            if peer is None:
                continue
            ratio = ours["img_s"] / peer["img_s"]
            checks.append({"batch": batch, "peer": peer_name, "target": target, "ratio": ratio,
                           "paired_median_ratio": paired_ratio(peer["seconds"], ours["seconds"]),
                           "passed": ratio >= target})
    return checks


def frozen_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(device, seeded random model on it without parameter gradients) from --threads/--device/--model/--seed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":  # before CUDA starts: cuDNN reads NVIDIA_TF32_OVERRIDE when it loads
        use_tf32(args.tf32 == "on")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    model = lrpscale.load_model(args.model, seed=args.seed).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return device, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 8])
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best counts (default 3)")
    parser.add_argument("--gradient-repeats", type=int, default=0,
                        help="extra rounds of forward, gradient and lrpscale only (default 0)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tf32", choices=["off", "on"], default="off",
                        help="CUDA only: TF32 convolutions and matmuls (default off: FP32, as the Analyzer runs)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    device, model = frozen_model(args, parser)
    explainers = {name: lrpscale.Explainer(model, name) for name in COMPOSITES}

    settings = {"model": f"{args.model} (random weights, seed {args.seed})", "size": args.size,
                "batch_sizes": args.batch_sizes, "repeats": args.repeats,
                "gradient_repeats": args.gradient_repeats, "warmup": args.warmup,
                "statistic": "best of repeats (median also shown)"}
    env = environment(device)
    print_environment(env, settings)
    if zennit is None:
        print("zennit is not importable: its rows, ratios and heatmap differences are skipped")

    def save(checks=()):  # after every batch size too, so a run cut short keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"settings": settings, "environment": env, "results": rows,
                                             "heatmap_difference": differences, "checks": list(checks)}, indent=2))

    rows, differences = [], {}
    print(f"\n{TABLE_HEADER}\n{'-' * len(TABLE_HEADER)}")
    for batch in args.batch_sizes:
        batch_rows, batch_differences = measure(model, explainers, batch, args, device)
        print_rows(batch_rows)
        rows += batch_rows
        differences.update({f"{name} batch {batch}": d for name, d in batch_differences.items()})
        save()
    if differences:
        print("\nmax |lrpscale - zennit| of normalised heatmaps (each / its sum |values|), relative to the largest value:")
        for key, value in differences.items():
            print(f"  {key}: {value:.2e}")
    checks = target_checks(rows)
    if checks:
        print("\ntargets (set for the 2-core CPU; informational):")
    for c in checks:
        print(f"  {'PASS' if c['passed'] else 'FAIL'}: lrpscale epsilon-gamma-box batch {c['batch']}: "
              f"{c['ratio']:.2f}x {c['peer']} (target >= {c['target']}x; paired median {c['paired_median_ratio']:.2f}x)")
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {env['load_average_end']}")
    save(checks)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
