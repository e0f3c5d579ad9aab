"""How many GPUs analyse ImageNet's training set (1,281,167 images) in a night, and which stage
limits first, from per-image costs measured here.

Stages and what is measured (median of --repeats, on one CPU core where it says so):
  decode    ``decoding.load_batch`` (read, JPEG decode, resize the shorter side, centre crop 224,
            normalise) of real ImageNet-sized JPEGs, in one process = one core. The JPEGs are
            crops, rescales and re-encodings (quality 75-95) of scikit-learn's two sample photos
            (427x640), sized like ImageNet's (mostly ~500x375).
  rows      the actor turning analysis records into Arrow rows (``pa.Table.from_pylist`` with
            ``tables.RESULT``), per image, on one core: runs next to the GPU, in the actor.
  write     the driver's ``tables.split_result`` + ``RunStore.commit`` per image, one core,
            on shards of 256 synthetic images shaped like VGG16 default results; and bytes/image.
  analysis  ``Analyzer`` (VGG16, random weights, 224x224, default config) on this CPU, a few images;
            on an H100 the figure measured by ``benchmarks/gpu_check.sh`` (benchmarks/README.md).

    python benchmarks/capacity.py [--jpegs 300] [--analysis-images 2] [--gpu-rate 106] [--hours 8]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

IMAGENET_TRAIN = 1_281_167
H100_ANALYSIS = 106.0  # img/s, whole analysis at batch 32 in FP32 as the actors run it (benchmarks/README.md, gpu_check.sh)


def make_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs in 10 class folders, ImageNet-sized variants of the two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    for i in range(count):
        photo = photos[i % 2]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        longer = int(rng.choice([500, 500, 500, 400, 640]))
        scale = longer / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        target = folder / f"n{i % 10:08d}" / f"n{i % 10:08d}_{i}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        crop.save(target, quality=int(rng.integers(75, 96)))
    return folder


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_decode(folder: Path, repeats: int) -> dict:
    from lrpscale.engine.models import IMAGENET_MEAN, IMAGENET_STD
    from lrpscale.inputs import decoding, sources

    listing = sources.list_inputs(str(folder))
    batch = {name: np.asarray(listing.column(name).to_pylist(), dtype=object) for name in listing.column_names}
    for name in ("row", "offset", "size"):
        batch[name] = listing.column(name).to_numpy()
    sizes = [os.path.getsize(p) for p in listing.column("uri").to_pylist()]
    out = decoding.load_batch(batch, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert out["ok"].all(), "a generated JPEG failed to decode"
    seconds = _median_seconds(lambda: decoding.load_batch(batch, 224, IMAGENET_MEAN, IMAGENET_STD), repeats)
    return {"images": listing.num_rows, "per_image_ms": 1000 * seconds / listing.num_rows,
            "img_per_s_per_core": listing.num_rows / seconds, "mean_jpeg_kb": float(np.mean(sizes)) / 1024}


def measure_rows_and_write(repeats: int) -> dict:
    from lrpscale.config import AnalysisConfig
    from lrpscale.run import synthetic
    from lrpscale.storage import tables
    from lrpscale.storage.store import RunStore

    listing, wnids = synthetic.imagenet_listing(1024, 4)
    label_index = np.searchsorted(wnids, listing.column("label").to_numpy(zero_copy_only=False)).astype(np.int32)
    preferences = synthetic._preferences(0, len(wnids))
    shard = listing.slice(0, 256)
    result = synthetic.shard_result(shard, 0, label_index[:256], wnids, preferences)
    rows = result.to_pylist()
    config = AnalysisConfig()
    row_seconds = _median_seconds(lambda: pa.Table.from_pylist(rows, schema=tables.RESULT), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunStore(tmp)
        counter = iter(range(10 ** 6))

        def write():
            shard_tables = tables.split_result(result, config.heatmap_size, config.deconv_size, config.deconv_mode,
                                               synthetic.MODEL_ID, "capacity")
            run.commit(next(counter), shard_tables, result.num_rows)

        write_seconds = _median_seconds(write, repeats)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("part-*.parquet")) / (next(counter) * result.num_rows)
    return {"rows_ms": 1000 * row_seconds / result.num_rows, "write_ms": 1000 * write_seconds / result.num_rows,
            "bytes_per_image": size}


def measure_analysis(images: int, repeats: int) -> dict:
    from lrpscale import load_model
    from lrpscale.engine.analyzer import Analyzer

    model = load_model("vgg16", seed=0).eval()
    analyzer = Analyzer(model)
    x = torch.randn(images, 3, 224, 224)
    analyzer(x[:1])  # warm-up
    seconds = _median_seconds(lambda: analyzer(x), repeats)
    return {"images": images, "img_per_s": images / seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpegs", type=int, default=300)
    parser.add_argument("--analysis-images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-rate", type=float, default=H100_ANALYSIS, help="analysis img/s per GPU")
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--cores-per-gpu-node", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"# capacity  {time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp), args.jpegs)
        decode = measure_decode(folder, args.repeats)
    print(f"decode   {decode['per_image_ms']:6.2f} ms/image/core = {decode['img_per_s_per_core']:6.1f} img/s per core "
          f"({decode['images']} JPEGs, mean {decode['mean_jpeg_kb']:.0f} KB; read+decode+resize+crop+normalise)",
          flush=True)
    io_cost = measure_rows_and_write(args.repeats)
    print(f"rows     {io_cost['rows_ms']:6.2f} ms/image/core  (actor: records -> Arrow RESULT rows)", flush=True)
    print(f"write    {io_cost['write_ms']:6.2f} ms/image/core = {1000 / io_cost['write_ms']:6.0f} img/s on the "
          f"driver  (split_result + commit, shards of 256); {io_cost['bytes_per_image'] / 1024:.1f} KB/image", flush=True)
    analysis = measure_analysis(args.analysis_images, args.repeats)
    print(f"analysis {analysis['img_per_s']:6.2f} img/s on this CPU ({analysis['threads']} threads, batch "
          f"{analysis['images']});  {args.gpu_rate:.0f} img/s per H100 (measured earlier, batch 32, FP32)", flush=True)

    seconds = args.hours * 3600
    need = IMAGENET_TRAIN / seconds
    per_gpu_rows = args.gpu_rate * io_cost["rows_ms"] / 1000  # cores busy turning records into rows
    gpu_rate = args.gpu_rate
    gpus = math.ceil(need / gpu_rate)
    decode_cores = gpu_rate / decode["img_per_s_per_core"]
    writer_cap = 1000 / io_cost["write_ms"]
    bandwidth = gpu_rate * io_cost["bytes_per_image"]
    print(f"\ncapacity: {IMAGENET_TRAIN:,} images in {args.hours:g} h needs {need:.1f} img/s", flush=True)
    print(f"  GPUs (H100, {gpu_rate:.0f} img/s each): {need / gpu_rate:.2f} -> {gpus}; one H100 takes "
          f"{IMAGENET_TRAIN / gpu_rate / 3600:.1f} h for the whole set", flush=True)
    print(f"  CPU cores for decode per GPU: {decode_cores:.2f} (+{per_gpu_rows:.2f} for the actor's rows); "
          f"a {args.cores_per_gpu_node}-core GPU node feeds "
          f"{args.cores_per_gpu_node / (decode_cores + per_gpu_rows):.1f} GPUs", flush=True)
    print(f"  write: {bandwidth / 1e6:.2f} MB/s per GPU, {need * io_cost['bytes_per_image'] / 1e6:.2f} MB/s for the "
          f"night, {IMAGENET_TRAIN * io_cost['bytes_per_image'] / 1e9:.1f} GB in all; the single driver writes "
          f"{writer_cap:.0f} img/s = {writer_cap / gpu_rate:.1f} GPUs' worth", flush=True)
    print(f"  on this CPU instead: {IMAGENET_TRAIN / analysis['img_per_s'] / 86400:.0f} days", flush=True)
    stages = {"analysis (GPU)": gpu_rate,
              f"decode ({args.cores_per_gpu_node} cores per GPU node)": args.cores_per_gpu_node
              * decode["img_per_s_per_core"] - per_gpu_rows * decode["img_per_s_per_core"],
              "writing (one driver core)": writer_cap}
    order = sorted(stages.items(), key=lambda kv: kv[1])
    print("  stage limits, img/s for one GPU node with one GPU: " + ", ".join(f"{k} {v:.0f}" for k, v in order),
          flush=True)
    gpus_at_writer = writer_cap / gpu_rate
    gpus_at_decode = args.cores_per_gpu_node / (decode_cores + per_gpu_rows)
    first = min([("analysis", 1.0), ("writing", gpus_at_writer), ("decode", gpus_at_decode)], key=lambda kv: kv[1])
    print(f"  adding GPUs: analysis limits up to {min(gpus_at_writer, gpus_at_decode):.1f} GPUs per "
          f"{args.cores_per_gpu_node}-core node/driver; beyond that "
          f"{'the single writing driver' if gpus_at_writer < gpus_at_decode else 'decode on the node'} limits first "
          f"(first limit: {first[0]})", flush=True)


if __name__ == "__main__":
    main()
