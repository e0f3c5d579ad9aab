"""What the Ray pipeline costs over a bare in-process loop, and what it writes.

Measures, in one invocation:
  1. img/s of the same images and engine through ``run_audit`` (decode tasks, actor pool writing shards, Parquet
     commits) and through a bare loop (list -> load_batch -> AnalyzerActor in this process);
  2. peak memory (driver RSS and the summed RSS of every process of the run, sampled) at N and
     10N images, each in a fresh subprocess;
  3. Parquet bytes per image at default analysis settings (VGG16, 224x224, random weights).

    python benchmarks/pipeline_overhead.py [--weights demo] [--n 180] [--bytes-images 16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _tree_rss() -> int:
    """Summed RSS (bytes) of this process and every Ray process on the machine."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if entry.name != str(os.getpid()) and b"ray" not in cmd:
                continue
            total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _write_digits(root: Path, count: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        folder = root / str(digits.target[i % len(digits.target)])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i % len(digits.images)] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def measure_run(images: int, weights: str, model: str, batch_size: int) -> dict:
    """One audit in this process (meant to run in a fresh subprocess): wall time and peak memory."""
    import ray

    from lrpscale.config import RunConfig
    from lrpscale.run.audit import run_audit

    work = Path(tempfile.mkdtemp(prefix="lrpscale-bench-"))
    source = _write_digits(work / "input", images)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 ** 2)
    peak = {"tree": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], _tree_rss())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = run_audit(RunConfig(input=str(source), output=str(work / "run"), model=model, weights=weights,
                                  batch_size=batch_size), progress=False)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    ray.shutdown()
    shutil.rmtree(work)
    steady = max(seconds - summary.warmup_seconds, 1e-9)
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds, "ok": summary.ok,
            "warmup_seconds": summary.warmup_seconds, "steady_img_per_s": images / steady,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tree_peak_rss_mb": peak["tree"] / 1024 ** 2}


def measure_bare_loop(images: int, weights: str, model: str, batch_size: int) -> dict:
    """The same decode + analysis code in a plain loop, no Ray, no Parquet (model load not timed)."""
    from lrpscale.config import AnalysisConfig
    from lrpscale.engine.models import input_normalization, load_model
    from lrpscale.inputs import decoding, sources
    from lrpscale.run.actor import AnalyzerActor

    work = Path(tempfile.mkdtemp(prefix="lrpscale-bench-"))
    source = _write_digits(work / "input", images)
    net = load_model(model, weights)
    mean, std = input_normalization(net)
    actor = AnalyzerActor(model, weights, AnalysisConfig().to_dict())
    started = time.perf_counter()  # like the pipeline's steady state: the model is loaded
    listing = sources.list_inputs(source)
    for offset in range(0, listing.num_rows, batch_size):
        part = listing.slice(offset, batch_size)
        columns = {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}
        batch = decoding.load_batch(columns, net.lrpscale_image_size, mean, std)
        batch["shard"] = np.zeros(part.num_rows, np.int32)
        actor(batch)
    seconds = time.perf_counter() - started
    shutil.rmtree(work)
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds}


def measure_bytes(images: int) -> dict:
    """Parquet bytes per image at default settings: VGG16, 224x224, random weights."""
    import ray
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from lrpscale.config import RunConfig
    from lrpscale.engine.models import build_vgg
    from lrpscale.run.audit import run_audit

    work = Path(tempfile.mkdtemp(prefix="lrpscale-bench-"))
    photos = load_sample_images().images
    folder = work / "input" / "photos"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):  # random 256x256 crops of the two sample photos
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 256), rng.integers(0, photo.shape[1] - 256)
        Image.fromarray(photo[y:y + 256, x:x + 256]).save(folder / f"{i:03d}.jpg")
    torch.manual_seed(0)
    torch.save(build_vgg("vgg16").state_dict(), work / "vgg16.pth")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    summary = run_audit(RunConfig(input=str(work / "input"), output=str(work / "run"), weights=str(work / "vgg16.pth"),
                                  batch_size=4), progress=False)
    ray.shutdown()
    tables = {p.name: sum(f.stat().st_size for f in p.glob("*.parquet")) for p in (work / "run").iterdir()
              if p.is_dir() and not p.name.startswith("_")}
    shutil.rmtree(work)
    total = sum(tables.values())
    return {"images": summary.ok, "bytes_per_image": total / summary.ok,
            "by_table": {k: v / summary.ok for k, v in tables.items()}}


def _in_subprocess(function: str, **kwargs) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import pipeline_overhead as b; "
            f"print('RESULT' + json.dumps(b.{function}(**{kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"{function} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="demo")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--n", type=int, default=180, help="N for the memory comparison (10N runs too)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bytes-images", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common = {"weights": args.weights, "model": args.model, "batch_size": args.batch_size}
    print(f"settings: model={args.model} weights={args.weights} batch={args.batch_size} N={args.n} "
          f"cpus={os.cpu_count()}")
    bare = _in_subprocess("measure_bare_loop", images=10 * args.n, **common)
    small = _in_subprocess("measure_run", images=args.n, **common)
    large = _in_subprocess("measure_run", images=10 * args.n, **common)
    sizes = _in_subprocess("measure_bytes", images=args.bytes_images)
    ratio = large["steady_img_per_s"] / bare["img_per_s"]
    memory = large["tree_peak_rss_mb"] / small["tree_peak_rss_mb"]
    driver = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    print(f"bare loop      {bare['images']:6d} images  {bare['img_per_s']:7.1f} img/s")
    print(f"ray pipeline   {large['images']:6d} images  {large['steady_img_per_s']:7.1f} img/s once running  "
          f"ratio {ratio:.2f}x  [{'PASS' if ratio >= 0.8 else 'FAIL'} >= 0.8x]")
    print(f"               {large['img_per_s']:7.1f} img/s including {large['warmup_seconds']:.1f} s of Ray "
          f"start-up and actor load ({large['img_per_s'] / bare['img_per_s']:.2f}x)")
    print(f"peak memory    N={small['images']}: {small['tree_peak_rss_mb']:.0f} MB (driver {small['driver_peak_rss_mb']:.0f})"
          f"  10N={large['images']}: {large['tree_peak_rss_mb']:.0f} MB (driver {large['driver_peak_rss_mb']:.0f})"
          f"  ratio {memory:.2f}x (driver {driver:.2f}x)  [{'PASS' if memory <= 1.2 else 'FAIL'} <= 1.2x]")
    print(f"parquet        {sizes['bytes_per_image'] / 1024:.1f} KB/image at defaults (VGG16 224x224, "
          f"{sizes['images']} images)  [{'PASS' if sizes['bytes_per_image'] <= 20 * 1024 else 'FAIL'} <= 20 KB]")
    print("               by table: " + ", ".join(f"{k} {v / 1024:.1f} KB" for k, v in sorted(sizes["by_table"].items())))
    if args.json:
        args.json.write_text(json.dumps({"bare": bare, "small": small, "large": large, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
