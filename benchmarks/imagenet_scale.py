"""What a run of ImageNet's size costs: bytes on disk, the reducer's time and memory, and the
time of an auditor's queries, on synthetic runs written through the real schema and writer
(``lrpscale.run.synthetic``).

For each --images count: generate the run (or reuse it), sum the Parquet bytes per image, run
the reducer (``reduce_run``, then the pictures alone) in a fresh subprocess
that reports its wall time and peak RSS (``ru_maxrss``). At the largest count, time four
queries with column projection and filters pushed down, each in fresh subprocesses (cold-ish:
new process, OS page cache as it is) and repeated in one process (warm); the peer is the same
query without pushdown (read the same columns of the whole table, then filter in pandas).

    python benchmarks/imagenet_scale.py [--images 128000,1281167] [--root /tmp/lrpscale-scale]
        [--repeats 5] [--cold 3] [--delete-largest] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from lrpscale.results import open_run

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("images", "neurons", "scores", "edges", "deconv", "errors")


# ---- the auditor's queries: (pushdown, peer) per name; each returns a small pandas object ----

def _probe(run: Path) -> dict:
    """The class and image the queries ask about: a class in the middle of the listing, and the
    last image of the run (a filter on the last file is the worst case for an unpruned scan)."""
    listing = pd.read_parquet(run / "_listing.parquet", columns=["image_id", "label"])
    labels = listing["label"].unique()
    return {"label": labels[len(labels) // 2], "image_id": listing["image_id"].iloc[-1]}


IMAGE_COLUMNS = ["image_id", "label", "pred_label", "prob", "rel_total", "conservation_error"]


def class_images(run: Path, probe: dict, pushdown: bool) -> pd.DataFrame:
    if pushdown:
        return pd.read_parquet(run / "images", columns=IMAGE_COLUMNS, filters=[("label", "==", probe["label"])])
    frame = pd.read_parquet(run / "images", columns=IMAGE_COLUMNS)
    return frame[frame["label"] == probe["label"]]


def class_top_neurons(run: Path, probe: dict, pushdown: bool) -> pd.Series:
    """The 5 most frequently selected neurons per layer of one class."""
    if pushdown:
        frame = pd.read_parquet(run / "neurons", columns=["layer", "neuron"], filters=[("label", "==", probe["label"])])
    else:
        frame = pd.read_parquet(run / "neurons", columns=["label", "layer", "neuron"])
        frame = frame[frame["label"] == probe["label"]]
    return frame.groupby(["layer", "neuron"]).size().groupby(level="layer", group_keys=False).nlargest(5)


def worst_explained(run: Path, probe: dict, pushdown: bool) -> pd.DataFrame:
    """The 100 images with the highest fidelity SMAPE at their chosen k."""
    if pushdown:
        frame = pd.read_parquet(run / "scores", columns=["image_id", "smape"],
                                filters=[("chosen", "==", True), ("variant", "==", "fidelity")])
    else:
        frame = pd.read_parquet(run / "scores", columns=["image_id", "variant", "chosen", "smape"])
        frame = frame[frame["chosen"] & (frame["variant"] == "fidelity")]
    return frame.nlargest(100, "smape")


def worst_explained_reduced(run: Path, probe: dict, pushdown: bool) -> pd.DataFrame:
    """The same 100 images from the reducer's one-file table of chosen-k scores; the peer is the
    pushed-down query on the scores table (5,005 files at 1.28M)."""
    if pushdown:
        return open_run(run).worst_explained(100)[["image_id", "smape"]]
    return worst_explained(run, probe, True)


def one_heatmap(run: Path, probe: dict, pushdown: bool):
    if pushdown:
        table = ds.dataset(run / "images", format="parquet").to_table(
            columns=["heatmap", "heatmap_scale"], filter=ds.field("image_id") == probe["image_id"])
    else:
        table = ds.dataset(run / "images", format="parquet").to_table(columns=["image_id", "heatmap", "heatmap_scale"])
        table = table.filter(ds.field("image_id") == probe["image_id"])
    picture = table.column("heatmap").combine_chunks().to_numpy_ndarray()[0].astype(np.float32)
    return picture * table.column("heatmap_scale")[0].as_py()


QUERIES = {"class_images": class_images, "class_top_neurons": class_top_neurons,
           "worst_explained": worst_explained, "worst_explained_reduced": worst_explained_reduced,
           "one_heatmap": one_heatmap}


def _run_query(run: Path, name: str, pushdown: bool, repeats: int) -> dict:
    """In this process: the first call (cold-ish) then ``repeats`` warm calls; seconds each."""
    probe = _probe(run)
    times, result = [], None
    for _ in range(1 + repeats):
        start = time.perf_counter()
        result = QUERIES[name](run, probe, pushdown)
        times.append(time.perf_counter() - start)
    return {"first": times[0], "warm": times[1:], "rows": int(len(result)), "summary": str(result)[:200]}


# ---- subprocess helpers ----

def _child(code: str) -> dict:
    """Run python code in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reduce_in_child(run: Path, pictures: bool) -> dict:
    """Wall time and peak RSS of the reducer (and the pictures) in a fresh process (its own ru_maxrss, in MB)."""
    return _child(f"""
import json, resource, shutil, time
from pathlib import Path
from lrpscale.report.class_pictures import reduce_with_pictures
run = Path({str(run)!r})
shutil.rmtree(run / "classes", ignore_errors=True)
start = time.perf_counter()
reduce_with_pictures(run, {pictures})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""")


def query_in_child(run: Path, name: str, pushdown: bool, repeats: int) -> dict:
    return _child(f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
from imagenet_scale import _run_query
print(json.dumps(_run_query(Path({str(run)!r}), {name!r}, {pushdown}, {repeats})))
""")


def run_bytes(run: Path, images: int) -> dict:
    tables = {t: sum(p.stat().st_size for p in (run / t).glob("part-*.parquet")) for t in TABLES}
    files = {t: len(list((run / t).glob("part-*.parquet"))) for t in TABLES}
    total = sum(tables.values())
    return {"bytes_per_image": total / images, "total_gb": total / 1e9, "files_per_table": files["images"],
            "per_table": {t: b / images for t, b in tables.items()}}


def generate(run: Path, images: int) -> dict:
    if (run / "run.json").is_file() and json.loads((run / "run.json").read_text()).get("status") == "complete":
        return {"reused": True}
    shutil.rmtree(run, ignore_errors=True)
    return _child(f"""
import json
from lrpscale.run.synthetic import generate_run
print(json.dumps(generate_run({str(run)!r}, {images}, processes=2)))
""")


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cpus ({cpu}), load {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="128000,1281167")
    parser.add_argument("--root", type=Path, default=Path("/tmp/lrpscale-scale"))
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per query process")
    parser.add_argument("--cold", type=int, default=3, help="fresh processes per query")
    parser.add_argument("--skip-pictures", action="store_true")
    parser.add_argument("--delete-largest", action="store_true", help="remove the largest run when done")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.images.split(",")]
    report: dict = {"machine": _machine(), "scales": {}}
    print(f"# imagenet_scale  {time.strftime('%Y-%m-%d %H:%M')}  {report['machine']}", flush=True)
    for images in counts:
        run = args.root / f"run-{images}"
        scale = {"generate": generate(run, images), "bytes": run_bytes(run, images)}
        scale["reduce"] = reduce_in_child(run, pictures=False)
        if images == min(counts) and not args.skip_pictures:  # pictures cover a bounded number of classes
            with_pictures = reduce_in_child(run, pictures=True)
            scale["pictures_seconds"] = with_pictures["seconds"] - scale["reduce"]["seconds"]
            scale["reduce_with_pictures"] = with_pictures
        report["scales"][images] = scale
        b, r = scale["bytes"], scale["reduce"]
        print(f"{images:>9} images  {b['bytes_per_image'] / 1024:6.2f} KB/image  ({b['total_gb']:.2f} GB, "
              f"{b['files_per_table']} files per table; "
              + ", ".join(f"{t} {v / 1024:.2f}" for t, v in b["per_table"].items()) + " KB)", flush=True)
        print(f"{'':>9} reducer {r['seconds']:7.1f} s   peak RSS {r['peak_mb']:7.0f} MB   (pictures=False)"
              + ("" if "pictures_seconds" not in scale else f";  pictures (64 classes per grouping) +{scale['pictures_seconds']:.1f} s,"
                 f" peak {scale['reduce_with_pictures']['peak_mb']:.0f} MB"), flush=True)
        if "seconds" in scale["generate"]:
            print(f"{'':>9} generated in {scale['generate']['seconds']:.0f} s", flush=True)
    largest = max(counts)
    run = args.root / f"run-{largest}"
    small, big = report["scales"][min(counts)], report["scales"][largest]
    print(f"reducer at {largest} vs {min(counts)} images: time {big['reduce']['seconds'] / small['reduce']['seconds']:.2f}x, "
          f"peak memory {big['reduce']['peak_mb'] / small['reduce']['peak_mb']:.2f}x", flush=True)
    print(f"\nqueries at {largest} images (seconds; cold-ish = first call in a fresh process, median of "
          f"{args.cold}; warm = median of {args.repeats} more calls per process)", flush=True)
    print(f"{'query':<20}{'rows':>6}{'cold-ish':>10}{'warm':>9}{'no pushdown':>13}{'ratio':>8}  goal < 5 s", flush=True)
    report["queries"] = {}
    for name in QUERIES:
        runs = [query_in_child(run, name, True, args.repeats) for _ in range(args.cold)]
        cold = statistics.median(r["first"] for r in runs)
        warm = statistics.median(t for r in runs for t in r["warm"])
        peer_run = run
        if name == "one_heatmap":  # the unpruned peer reads every heatmap: 8 GB at 1.28M
            peer_run = args.root / f"run-{min(counts)}"
        peer = query_in_child(peer_run, name, False, 1)
        peer_seconds = statistics.median([peer["first"], *peer["warm"]])
        note = "" if peer_run == run else f"  (peer at {min(counts)} images)"
        if name == "worst_explained_reduced":
            note = "  (peer: worst_explained on the scores table, with pushdown)"
        report["queries"][name] = {"cold": cold, "warm": warm, "rows": runs[0]["rows"], "peer": peer_seconds,
                                   "peer_images": min(counts) if peer_run != run else largest}
        ratio = peer_seconds / warm
        print(f"{name:<20}{runs[0]['rows']:>6}{cold:>10.2f}{warm:>9.2f}{peer_seconds:>13.2f}{ratio:>7.1f}x  "
              f"{'PASS' if max(cold, warm) < 5 else 'FAIL'}{note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.delete_largest:
        shutil.rmtree(run)
        print(f"removed {run}")


if __name__ == "__main__":
    main()
