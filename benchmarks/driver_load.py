"""The driver's CPU time per image, before and after the actors write their own results.

Before (the driver split every shard's result rows into the tables and wrote them): the same work
measured here, in this process, on shards of synthetic results shaped like VGG16's at the 224x224
defaults (``lrpscale.run.synthetic``): ``tables.split_result`` + ``RunStore.commit`` per image.
It leaves out receiving the rows from the object store, so it understates the old cost.

After: ``run_audit`` on a local Ray with several actors that emit full-size VGG16-shaped results
quickly (``SyntheticActor``: the real actor's shard path, ``split_result`` + ``write_shard``, fed
by ``synthetic.shard_result`` instead of a model), so the driver, not the model, is what is
measured. The driver's CPU time (``time.process_time``, every thread of the driver process) is
taken for a small and a large run; the difference divided by the difference in images is the
marginal cost per image, free of start-up costs (Ray, the model load for the run id, listing).
The inputs are a manifest of files that do not exist: decoding turns each into an error row in
microseconds, and the synthetic actor writes an analysis for it anyway.

    python benchmarks/driver_load.py [--small 2560] [--large 15360] [--actors 3] [--shard-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from lrpscale.config import AnalysisConfig, RunConfig
from lrpscale.run import audit, synthetic
from lrpscale.run.session import ensure_ray
from lrpscale.storage import tables
from lrpscale.storage.store import RunStore, new_attempt

CLASSES = 100


class SyntheticActor:
    """The analyser actor's shard path with ``synthetic.shard_result`` in place of the model: the
    same constructor and ``analyse_shard`` contract as ``AnalyzerActor``."""

    def __init__(self, model, weights, analysis, device=None, tf32=False, output=None, run_id=None, image_size=None,
                 batch_size=16):
        self.config = AnalysisConfig.from_mapping(analysis)
        self.store = RunStore(output)
        self.run_id = run_id
        self.wnids = [f"n{i:08d}" for i in range(CLASSES)]
        self.preferences = synthetic._preferences(0, CLASSES)

    def analyse_shard(self, shard: int, batch: dict[str, np.ndarray], attempt: str) -> dict:
        started = time.perf_counter()
        result = _synthetic_result(batch, shard, self.wnids, self.preferences, self.config)
        split = tables.split_result(result, self.config.heatmap_size, self.config.deconv_size, self.config.deconv_mode,
                                    synthetic.MODEL_ID, self.run_id, self.config.composite)
        files = self.store.write_shard(shard, attempt, split)
        return {"shard": shard, "attempt": attempt, "rows": result.num_rows, "errors": 0, "files": files,
                "node": None, "seconds": time.perf_counter() - started}


def _synthetic_result(batch: dict, shard: int, wnids: list[str], preferences, config: AnalysisConfig) -> pa.Table:
    """VGG16-shaped RESULT rows for the inputs of a decoded shard (their labels become class indices)."""
    labels = [str(label) for label in batch["label"]]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    listing = pa.table({"image_id": pa.array([str(i) for i in batch["image_id"]], pa.string()),
                        "uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
                        "label": pa.array(labels, pa.string())})
    label_index = np.array([index[label] for label in labels], np.int32)
    return synthetic.shard_result(listing, shard, label_index, wnids, preferences, seed=0, config=config)


def _manifest(folder: Path, images: int) -> Path:
    """A CSV manifest of ``images`` files that do not exist, in CLASSES classes."""
    path = folder / f"manifest-{images}.csv"
    lines = ["uri,label"] + [f"missing/{i:07d}.jpg,n{i % CLASSES:08d}" for i in range(images)]
    path.write_text("\n".join(lines) + "\n")
    return path


def driver_seconds(root: Path, images: int, actors: int, shard_size: int) -> dict:
    """One run_audit of ``images`` synthetic images: driver CPU seconds, wall seconds, files."""
    config = RunConfig(input=str(_manifest(root, images)), output=str(root / f"run-{images}"), model="vgg16",
                       image_size=16, shard_size=shard_size, num_actors=actors, actor_resources={"num_cpus": 1},
                       analysis=AnalysisConfig(faithfulness_sample=0))
    cpu, wall = time.process_time(), time.perf_counter()
    summary = audit.run_audit(config, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    committed = RunStore(config.output).committed_rows("images")
    assert committed == images, f"{committed} images committed of {images}"
    return {"images": images, "driver_cpu_s": cpu, "wall_s": wall, "images_per_s": summary.images_per_second}


def before_ms_per_image(root: Path, shards: int, shard_size: int) -> float:
    """The old driver's work per image: split_result + RunStore.commit of synthetic VGG16 shards."""
    config = AnalysisConfig()
    wnids = [f"n{i:08d}" for i in range(CLASSES)]
    preferences = synthetic._preferences(0, CLASSES)
    store = RunStore(root / "before")
    total = 0.0
    for shard in range(shards):
        ids = np.array([f"n{(shard * shard_size + i) % CLASSES:08d}/{shard}-{i}.jpg" for i in range(shard_size)],
                       dtype=object)
        batch = {"image_id": ids, "uri": ids, "label": np.array([i.split("/")[0] for i in ids], dtype=object)}
        result = _synthetic_result(batch, shard, wnids, preferences, config)
        started = time.process_time()
        split = tables.split_result(result, config.heatmap_size, config.deconv_size, config.deconv_mode,
                                    synthetic.MODEL_ID, "before", config.composite)
        store.mark_committed(shard, attempt := new_attempt(), store.write_shard(shard, attempt, split), result.num_rows)
        total += time.process_time() - started
    return total / (shards * shard_size) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2560, help="images of the small run (default 2560)")
    parser.add_argument("--large", type=int, default=15360, help="images of the large run (default 15360)")
    parser.add_argument("--actors", type=int, default=3, help="synthetic actors (default 3)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--before-shards", type=int, default=8, help="shards timed for the old path (default 8)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    audit.AnalyzerActor = SyntheticActor  # the driver under test is run_audit's; only the model is replaced
    ensure_ray(num_cpus=max(6, args.actors + 2))
    with tempfile.TemporaryDirectory(prefix="lrpscale-driver-") as folder:
        root = Path(folder)
        before = before_ms_per_image(root, args.before_shards, args.shard_size)
        small = driver_seconds(root, args.small, args.actors, args.shard_size)
        large = driver_seconds(root, args.large, args.actors, args.shard_size)
    after = (large["driver_cpu_s"] - small["driver_cpu_s"]) / (large["images"] - small["images"]) * 1e3
    print(f"settings: shard_size={args.shard_size}, actors={args.actors} (synthetic VGG16 224 results, "
          f"{os.cpu_count()} cores), runs of {args.small} and {args.large} images")
    print(f"before: the driver's split_result + commit per image      {before:8.4f} ms  (in-process, {args.before_shards} shards)")
    for run in (small, large):
        print(f"after:  run_audit of {run['images']:>6} images: driver CPU {run['driver_cpu_s']:7.2f} s, wall "
              f"{run['wall_s']:6.1f} s, {run['images_per_s']:6.0f} img/s")
    print(f"after:  the driver's marginal CPU per image                {after:8.4f} ms")
    print(f"ratio:  {before / after:.1f}x less driver CPU per image; one driver core feeds "
          f"{1e3 / after:,.0f} img/s (before {1e3 / before:,.0f} img/s)")
    if args.json:
        args.json.write_text(json.dumps({"before_ms": before, "after_ms": after, "small": small, "large": large}, indent=2))


if __name__ == "__main__":
    main()
