"""SpRAy's strategies over a synthetic ImageNet-size run (``lrpscale.run.synthetic``, 1,000 classes):
the wall time per stage and the peak memory of everything that runs, the driver and Ray's own
processes together, and the peers that bound the regrouping pass.

The strategies run in a fresh driver process on a fresh local Ray (``--num-cpus`` CPUs, a bounded
object store, no dashboard; references off, the synthetic run has no images to decode). The peak
memory is sampled every ``--interval`` seconds as the summed PSS (proportional set size: a page
shared by n processes counts 1/n in each, so Ray's object store is counted once) of the driver
and all its descendants (Ray's GCS, raylet and workers are children of a locally started driver),
and, as a cross-check, the machine's used memory (MemTotal - MemAvailable) above its level before
the start.

Peers, measured after the run on the same files:
- *one read of the heatmaps*: a bare loop reading the image_id, label, pred and heatmap columns of
  every shard once, the floor for any pass that needs every heatmap;
- *direct class reads*: for ``--peer-classes`` classes by prediction, the rows read straight from
  the shards the class lies in (a filter on pred), as lrpscale read them before the regrouping; the
  time per class, times the number of classes, is what the direct reads would cost the whole run.

    python benchmarks/strategies_scale.py [--images 1281167] [--root /tmp/lrpscale-scale]
        [--num-cpus 2] [--features heatmap] [--peer-classes 20] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from imagenet_scale import _machine, generate  # noqa: E402  (same run, same generator)

DRIVER = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
import ray
ray.init(num_cpus={num_cpus}, object_store_memory={store}, include_dashboard=False, log_to_driver=False)
from lrpscale.run.strategies import run_strategies
summary = run_strategies({run!r}, features={features!r}, references=False)
classes = summary.classes
print(json.dumps({{"seconds": summary.seconds, "stages": summary.stages, "classes": len(classes),
                  "several": int((classes["clusters"] > 1).sum()), "images": int(classes["images"].sum())}}))
"""


def _used_mb() -> float:
    memory = psutil.virtual_memory()
    return (memory.total - memory.available) / 2**20


def _tree_pss_mb(root: psutil.Process, largest: dict) -> float:
    """Summed PSS of ``root`` and its descendants in MB; ``largest`` keeps each process's peak."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            pss = process.memory_full_info().pss / 2**20
            name = " ".join(process.cmdline()[:1]).rpartition("/")[2] or process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += pss
        key = f"{process.pid} {name}"
        largest[key] = max(largest.get(key, 0.0), pss)
    return total


def run_measured(run: Path, num_cpus: int, store_mb: int, features: str, interval: float) -> dict:
    """The strategies in a child driver; its result and the peaks sampled while it ran."""
    script = DRIVER.format(num_cpus=num_cpus, store=store_mb * 2**20, run=str(run), features=features)
    baseline = _used_mb()
    started = time.time()
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
    peaks = {"pss_mb": 0.0, "used_mb": 0.0, "samples": 0}
    largest: dict[str, float] = {}
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True)
    reader.start()
    process = psutil.Process(child.pid)
    while child.poll() is None:
        peaks["pss_mb"] = max(peaks["pss_mb"], _tree_pss_mb(process, largest))
        peaks["used_mb"] = max(peaks["used_mb"], _used_mb() - baseline)
        peaks["samples"] += 1
        time.sleep(interval)
    out = child.stdout.read()
    reader.join(5)
    if child.returncode:
        sys.stderr.write("".join(stderr[-40:]))
        raise SystemExit(f"the strategies driver failed with exit code {child.returncode}")
    progress = [line.rstrip() for line in stderr if "strategies:" in line]
    top = dict(sorted(largest.items(), key=lambda item: -item[1])[:4])
    return {**json.loads(out.strip().splitlines()[-1]), **peaks, "wall": time.time() - started,
            "largest_processes_mb": top, "progress_tail": progress[-3:]}


def one_read_of_the_heatmaps(run: Path) -> float:
    """Seconds to read image_id, label, pred and heatmap of every committed shard once."""
    from lrpscale.storage.store import RunStore

    store = RunStore(run)
    started = time.time()
    for path in store.committed_files("images"):
        ds.dataset(path, format="parquet").to_table(columns=["image_id", "label", "pred", "heatmap"])
    return time.time() - started


def direct_class_reads(run: Path, classes: int) -> dict:
    """Seconds per class to read one prediction class's rows (image_id, label_index, pred, heatmap)
    and its selected neurons straight from the shards it lies in, over ``classes`` classes spread
    across the class order."""
    from lrpscale.results.strategies import class_index
    from lrpscale.storage.store import RunStore

    store = RunStore(run)
    index = class_index(store)
    pred = index[index["grouping"] == "pred"].reset_index(drop=True)
    chosen = pred.iloc[[round(i * (len(pred) - 1) / max(classes - 1, 1)) for i in range(classes)]]
    images_files = {path.rpartition("/")[2]: path for path in store.committed_files("images")}
    neurons_files = {path.rpartition("/")[2]: path for path in store.committed_files("neurons")}
    started = time.time()
    shards = 0
    for cls, names in zip(chosen["class"], chosen["shards"]):
        where = ds.field("pred") == int(cls)
        ds.dataset([images_files[n] for n in names], format="parquet").to_table(
            columns=["image_id", "label_index", "pred", "heatmap"], filter=where)
        ds.dataset([neurons_files[n] for n in names], format="parquet").to_table(
            columns=["image_id", "layer", "neuron"], filter=where)
        shards += len(names)
    seconds = time.time() - started
    return {"per_class": seconds / len(chosen), "classes_measured": len(chosen), "shards_per_class": shards / len(chosen),
            "classes_in_run": len(index)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--root", type=Path, default=Path("/tmp/lrpscale-scale"))
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--features", choices=("heatmap", "channels"), default="heatmap")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--peer-classes", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = args.root / f"run-{args.images}"
    print(f"# strategies_scale  {time.strftime('%Y-%m-%d %H:%M')}  {_machine()}", flush=True)
    generated = generate(run, args.images)
    if "seconds" in generated:
        print(f"generated {args.images} images in {generated['seconds']:.0f} s", flush=True)
    result = run_measured(run, args.num_cpus, args.object_store_mb, args.features, args.interval)
    stages = "  ".join(f"{name} {seconds:.0f} s" for name, seconds in result["stages"].items())
    print(f"strategies ({args.features} features, {args.num_cpus} Ray CPUs, object store {args.object_store_mb} MB): "
          f"{result['images']} images in {result['classes']} classes (both groupings), {result['several']} with more "
          f"than one cluster", flush=True)
    print(f"  time  {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min; {stages}); "
          f"{result['wall']:.0f} s wall with Ray's start", flush=True)
    print(f"  peak memory  {result['pss_mb']:.0f} MB summed PSS of the driver and Ray's processes; "
          f"{result['used_mb']:.0f} MB more machine memory used than before the start  "
          f"({result['samples']} samples)  goal < 4096 MB: "
          f"{'PASS' if max(result['pss_mb'], result['used_mb']) < 4096 else 'FAIL'}", flush=True)
    print("  largest processes at their peaks (PSS): " + ", ".join(
        f"{name} {mb:.0f} MB" for name, mb in result["largest_processes_mb"].items()), flush=True)
    read_once = one_read_of_the_heatmaps(run)
    print(f"  peer, one read of the heatmaps: {read_once:.0f} s; the regrouping pass took "
          f"{result['stages']['regroup'] / read_once:.2f}x that (on {args.num_cpus} CPUs against one loop)", flush=True)
    direct = direct_class_reads(run, args.peer_classes)
    whole = direct["per_class"] * direct["classes_in_run"] / 2  # the measured classes are by prediction
    print(f"  peer, direct class reads: {direct['per_class']:.2f} s per prediction class ({direct['shards_per_class']:.0f} "
          f"shards each, {direct['classes_measured']} measured); for the run's {direct['classes_in_run'] // 2} "
          f"prediction classes ~{whole:.0f} s in one loop, {whole / result['stages']['regroup']:.1f}x the regrouping "
          f"pass", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine(), "result": result, "one_read": read_once,
                                         "direct": direct, "settings": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
