"""The dataset audit on Ray: list once, decode in CPU tasks, analyse in a pool of model replicas,
commit results shard by shard.

Exactly once, by per-shard commits: the listing is frozen into the run directory on the first
start and cut into shards. The driver collects each shard's result rows and, once the shard is
complete, writes its file in every table (each written to a hidden temporary name, then renamed)
and finally a commit marker ``_commits/part-NNNNN.json``. A shard without a marker is not part of
the run: its table files are removed and it is analysed again on the next start. Re-running a
complete run does nothing unless ``overwrite``. The pipeline knows nothing of LRP rules: the
actor hands a batch to ``Analyzer`` and turns its records into Arrow rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import __version__, data, schema
from .analyze import AnalysisConfig, Analyzer, use_tf32
from .models import input_normalization, load_model

COMMITS = "_commits"
LISTING = "_listing.parquet"


@dataclass
class RunConfig:
    """One audit. ``actor_resources`` is the per-actor request (default ``{"num_gpus": 1}`` when
    the cluster has GPUs, else one CPU); ``num_actors`` defaults to one per GPU, else one."""

    input: str
    output: str
    model: str = "vgg16"
    weights: str | None = None
    input_kind: str | None = None
    image_size: int | None = None
    batch_size: int = 16
    shard_size: int = 256
    num_actors: int | None = None
    actor_resources: dict | None = None
    max_pixels: int = data.DEFAULT_MAX_PIXELS
    tf32: bool = False
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @classmethod
    def from_mapping(cls, values: dict) -> "RunConfig":
        """A RunConfig from a job's YAML mapping; ``analysis`` is a mapping of AnalysisConfig fields.
        Unknown keys are an error naming them, so a typo in a config does not pass silently."""
        values = dict(values)
        analysis = values.pop("analysis", None) or {}
        unknown = sorted(set(values) - {f.name for f in fields(cls)}) + sorted(
            f"analysis.{key}" for key in set(analysis) - {f.name for f in fields(AnalysisConfig)})
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; run settings are {[f.name for f in fields(cls)]}, "
                             f"analysis settings {[f.name for f in fields(AnalysisConfig)]}")
        return cls(**values, analysis=AnalysisConfig(**analysis))

    def fingerprint(self, model_id: str) -> dict:
        """What makes two runs the same run (and a resume legal): model, input, analysis, size."""
        return {"model_id": model_id, "input": os.path.abspath(self.input), "input_kind": self.input_kind,
                "image_size": self.image_size, "analysis": self.analysis.to_dict(), "schema_version": schema.SCHEMA_VERSION}


def run_id_for(fingerprint: dict) -> str:
    """Stable id of a run: model weights, analysis config, schema and code version."""
    key = {k: v for k, v in fingerprint.items() if k not in ("input", "input_kind")}
    key["lrpscale"] = __version__
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def label_indices(labels, classes: list[str] | None, num_classes: int) -> list[int | None]:
    """Map label strings to class indices: by the class names where known, else integer labels."""
    lookup = {name: i for i, name in enumerate(classes or [])}
    out = []
    for label in labels:
        if label is None:
            out.append(None)
        elif label in lookup:
            out.append(lookup[label])
        elif str(label).isdigit() and int(label) < num_classes:
            out.append(int(label))
        else:
            out.append(None)
    return out


class AnalyzerActor:
    """A model replica: ``__init__`` loads the model once, ``__call__`` analyses one batch.

    Takes a ``data.load_batch`` output (numpy columns) and returns a ``schema.RESULT`` table with
    one row per input, each naming the Ray node that analysed it. A batch that fails in the model
    is retried image by image, so one bad input becomes an ``analyze`` error row instead of
    taking its batch down.
    """

    def __init__(self, model: str, weights: str | None, analysis: dict, device: str | None = None,
                 tf32: bool = False):
        # the actor owns its process: TF32 convolutions select slightly different neurons than the
        # CPU does, so full FP32 is the default and TF32 an opt-in for speed; set before CUDA starts
        use_tf32(tf32)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = load_model(model, weights).to(self.device)
        self.analyzer = Analyzer(net, AnalysisConfig(**analysis))
        self.classes = net.lrpscale_classes
        self.num_classes = net.classifier[-1].out_features
        self.config = self.analyzer.config
        self.node_id = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["image_id"])
        rows: list[dict] = [self._base_row(batch, i) for i in range(count)]
        good = [i for i in range(count) if bool(batch["ok"][i])]
        if good:
            for i, record in zip(good, self._analyse(batch, good)):
                rows[i].update(record)
        return pa.Table.from_pylist(rows, schema=schema.RESULT)

    def _base_row(self, batch, i: int) -> dict:
        label = _text(batch["label"][i])
        return {"image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "label": label,
                "label_index": label_indices([label], self.classes, self.num_classes)[0],
                "shard": int(batch["shard"][i]), "node_id": self.node_id,
                **{name: _text(batch[name][i]) for name in data.ERROR_FIELDS}}

    def _analyse(self, batch, indices: list[int]) -> list[dict]:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][indices])).to(self.device)
        labels = label_indices([_text(batch["label"][i]) for i in indices], self.classes, self.num_classes)
        try:
            return self._records(pixels, labels)
        except Exception:
            if len(indices) == 1:
                raise
        out = []
        for position, i in enumerate(indices):
            try:
                out.extend(self._records(pixels[position:position + 1], labels[position:position + 1]))
            except Exception as error:  # the image, not the run, fails
                out.append({"error_stage": "analyze", "error_type": type(error).__name__,
                            "error_message": str(error)[:2000]})
        return out

    def _records(self, pixels: torch.Tensor, labels: list[int | None]) -> list[dict]:
        if self.config.target == "label" and any(label is None for label in labels):
            raise ValueError("target='label' but the label is missing or not one of the model's classes")
        label_tensor = torch.tensor([-1 if l is None else l for l in labels], device=self.device)
        analysis = self.analyzer(pixels, label_tensor if self.config.target == "label" else None)
        rows = []
        for record in analysis.records():
            heatmap, scale = schema.scaled_float16(record["heatmap"])
            deconv = []
            for item in record["deconv"]:
                picture, picture_scale = schema.scaled_float16(item["reconstruction"])
                deconv.append({"layer": item["layer"], "neuron": item["neuron"], "scale": picture_scale,
                               "reconstruction": picture})
            pred = record["pred"]
            rows.append({**{k: record[k] for k in ("pred", "target", "logit", "prob", "rel_total", "rel_pos",
                                                  "rel_neg", "conservation_error", "neurons", "scores", "edges")},
                         "pred_label": self.classes[pred] if self.classes else str(pred),
                         "heatmap": heatmap, "heatmap_scale": scale, "deconv": deconv})
        return rows


def _node_id() -> str | None:
    """The Ray node this process runs on; None outside Ray (the actor class used alone, also
    where Ray is not installed, as on a bare GPU machine)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _text(value) -> str | None:
    """A string cell from a Ray batch: Ray turns a column that is all None into floats (NaN)."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return str(value)


@dataclass
class RunSummary:
    output: Path
    run_id: str
    images: int
    ok: int
    errors: int
    seconds: float
    analysed_now: int
    already_complete: bool = False
    warmup_seconds: float = 0.0  # start-up until the first results reached the driver


    @property
    def images_per_second(self) -> float:
        return self.analysed_now / self.seconds if self.seconds else 0.0


class RunDirectory:
    """The files of one run: tables (one Parquet dataset each), commit markers, listing, run.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def table(self, name: str) -> Path:
        return self.root / name

    def shard_file(self, table: str, shard: int) -> Path:
        return self.root / table / f"part-{shard:05d}.parquet"

    def committed(self) -> set[int]:
        folder = self.root / COMMITS
        return {int(p.stem.split("-")[1]) for p in folder.glob("part-*.json")} if folder.is_dir() else set()

    def read_json(self) -> dict | None:
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, content: dict) -> None:
        _atomic_write_bytes(self.root / "run.json", json.dumps(content, indent=2, default=str).encode())

    def discard_uncommitted(self, shards: set[int]) -> None:
        """Remove table files of shards without a commit marker (a crash between renames)."""
        for table in schema.TABLES:
            for shard in shards:
                self.shard_file(table, shard).unlink(missing_ok=True)

    def commit(self, shard: int, tables: dict[str, pa.Table], rows: int, nodes: list[str] = ()) -> None:
        """Write a shard's file in every table, then its marker (``nodes``: the Ray nodes whose
        actors analysed it)."""
        for name, table in tables.items():
            path = self.shard_file(name, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
        marker = {"shard": shard, "rows": rows, "time": time.time(), "nodes": sorted(nodes)}
        _atomic_write_bytes(self.root / COMMITS / f"part-{shard:05d}.json", json.dumps(marker).encode())


def _atomic_write_bytes(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def ensure_ray(address: str | None = None, **local_options) -> None:
    """Join the cluster at ``address`` / RAY_ADDRESS, or start a local Ray: loopback only, no
    dashboard, at least 4 logical CPUs; ``local_options`` go to ``ray.init`` for a local start."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    options = {"include_dashboard": False, "log_to_driver": False, "num_cpus": max(4, os.cpu_count() or 1)}
    with _loopback_only():
        ray.init(**{**options, **local_options})


@contextmanager
def _loopback_only():
    """Start a local Ray whose processes listen on 127.0.0.1 only.

    Ray takes the machine's outward address as the node address and its GCS, raylet and agents
    then listen on every interface (ray-project/ray#59110). Its single-machine switch,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, keeps them on loopback; Ray reads it when it is
    imported, so the driver's already-imported constant is set too. Both are restored after
    the start: the processes Ray started keep the setting, a later join of a real cluster does not.
    """
    from ray._private import ray_constants

    variable, saved = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved


def _default_actors(config: RunConfig) -> tuple[int, dict]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # a CPU actor gets 2 CPUs: Ray limits its torch threads to them, and requests that differ
    # from the decode tasks' keep Ray Data from fusing decoding into the actors
    resources = config.actor_resources or ({"num_gpus": 1} if gpus else {"num_cpus": 2})
    if config.num_actors:
        return config.num_actors, resources
    if "num_gpus" in resources and gpus:
        return max(1, int(gpus / resources["num_gpus"])), resources
    custom = resources.get("resources", {})
    if custom:  # e.g. one accelerator slot per actor advertised as a custom resource
        name, amount = next(iter(custom.items()))
        return max(1, int(ray.cluster_resources().get(name, 0) // amount)), resources
    return 1, resources


class _Progress:
    """One status line every few seconds: images done, rate, errors."""

    def __init__(self, total: int, already: int, stream=sys.stderr, every: float = 5.0):
        self.total, self.done, self.errors = total, already, 0
        self.start = time.time()
        self.last = 0.0
        self.stream, self.every = stream, every
        self.now = 0

    def update(self, rows: int, errors: int) -> None:
        self.done += rows
        self.now += rows
        self.errors += errors
        if time.time() - self.last >= self.every or self.done >= self.total:
            self.last = time.time()
            rate = self.now / max(time.time() - self.start, 1e-9)
            print(f"[lrpscale] {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.1f} img/s, {self.errors} errors", file=self.stream, flush=True)


def run_audit(config: RunConfig, address: str | None = None, overwrite: bool = False,
              progress: bool = True, new_inputs: bool = False) -> RunSummary:
    """Analyse every input of ``config.input`` into the run directory ``config.output``.

    new_inputs: list the input again and add the images that appeared since the run's listing
    was frozen, as new shards (images already listed keep their shard, so each stays once).
    """
    import ray

    started = time.time()
    model = load_model(config.model, config.weights)
    mean, std = input_normalization(model)
    config.image_size = config.image_size or model.lrpscale_image_size
    fingerprint = config.fingerprint(model.lrpscale_model_id)
    run_id = run_id_for(fingerprint)
    run = RunDirectory(config.output)
    previous = run.read_json()
    if previous and (overwrite or previous.get("fingerprint") != fingerprint):
        if not overwrite:
            raise RuntimeError(f"{run.root} holds a run with another model, input or configuration "
                               f"(run {previous.get('run_id')}); choose another --output or pass --overwrite")
        shutil.rmtree(run.root)
        previous = None
    run.root.mkdir(parents=True, exist_ok=True)

    listing_path = run.root / LISTING
    if not listing_path.is_file():
        _write_listing(listing_path, _sharded(data.list_inputs(config.input, config.input_kind), 0,
                                              config.shard_size))
    elif new_inputs:
        _add_new_inputs(listing_path, data.list_inputs(config.input, config.input_kind), config.shard_size,
                        progress)
    listing = pq.read_table(listing_path)
    shard_ids = listing.column("shard").to_numpy()
    all_shards = set(np.unique(shard_ids).tolist())
    committed = run.committed() & all_shards
    pending = sorted(all_shards - committed)
    run.discard_uncommitted(set(pending))
    base = {"run_id": run_id, "fingerprint": fingerprint, "config": _config_dict(config),
            "model_id": model.lrpscale_model_id, "composite": config.analysis.composite,
            "versions": _versions(), "input": os.path.abspath(config.input), "images": listing.num_rows,
            "shards": len(all_shards), "created": (previous or {}).get("created", time.time())}
    if not pending:
        counts = _committed_counts(run)
        if progress:
            print(f"[lrpscale] {run.root} is already complete ({counts['ok']} images, {counts['errors']} errors); "
                  "pass --overwrite to analyse again", file=sys.stderr)
        return RunSummary(run.root, run_id, listing.num_rows, counts["ok"], counts["errors"], 0.0, 0, True)
    run.write_json({**base, "status": "running", "started": started})

    ensure_ray(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    num_actors, resources = _default_actors(config)
    expected = {int(s): int(c) for s, c in zip(*np.unique(shard_ids, return_counts=True))}
    pending_set = set(pending)
    mask = np.isin(shard_ids, pending)
    todo = listing.filter(pa.array(mask))
    blocks = [todo.slice(offset, config.shard_size) for offset in range(0, todo.num_rows, config.shard_size)]
    dataset = ray.data.from_arrow(blocks)
    dataset = dataset.map_batches(data.load_batch, batch_size=config.shard_size, batch_format="numpy", num_cpus=1,
                                  fn_kwargs={"image_size": config.image_size, "mean": mean, "std": std,
                                             "max_pixels": config.max_pixels})
    dataset = dataset.map_batches(
        AnalyzerActor, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": config.model, "weights": config.weights,
                               "analysis": config.analysis.to_dict(), "tf32": config.tf32},
        compute=ray.data.ActorPoolStrategy(size=num_actors), **resources)

    pieces: dict[int, list[pa.Table]] = defaultdict(list)
    seen: dict[int, set[str]] = defaultdict(set)
    meter = _Progress(listing.num_rows, sum(expected[s] for s in committed), every=5.0 if progress else 1e9)
    model_id = model.lrpscale_model_id
    side = min(config.analysis.heatmap_size, config.image_size)
    deconv_side = min(config.analysis.deconv_size, config.image_size)
    first_result = None
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        first_result = first_result or time.time()
        shards = batch.column("shard").to_numpy()
        for shard in np.unique(shards).tolist():
            part = batch.filter(pa.array(shards == shard))
            ids = part.column("image_id").to_pylist()
            fresh = [image_id not in seen[shard] for image_id in ids]
            if shard not in pending_set or not any(fresh):
                continue
            if not all(fresh):  # a replayed batch must not duplicate rows
                part = part.filter(pa.array(fresh))
            seen[shard].update(ids)
            pieces[shard].append(part)
            meter.update(part.num_rows, int(pc.sum(part.column("error_stage").is_valid()).as_py() or 0))
            if len(seen[shard]) == expected[shard]:
                result = pa.concat_tables(pieces.pop(shard))
                tables = schema.split_result(result, side, deconv_side, config.analysis.deconv_mode, model_id,
                                             run_id)
                nodes = pc.unique(result.column("node_id")).drop_null().to_pylist()
                run.commit(shard, tables, result.num_rows, nodes)
                pending_set.discard(shard)
                del seen[shard]
    if pending_set:
        raise RuntimeError(f"shards {sorted(pending_set)} did not complete; run the same command again to resume")
    counts = _committed_counts(run)
    seconds = time.time() - started
    analysed = sum(expected[s] for s in pending)
    run.write_json({**base, "status": "complete", "started": started, "finished": time.time(),
                    "seconds_last_start": seconds, "images_per_second_last_start": analysed / seconds,
                    "ok": counts["ok"], "errors": counts["errors"]})
    return RunSummary(run.root, run_id, listing.num_rows, counts["ok"], counts["errors"], seconds, analysed,
                      warmup_seconds=(first_result or time.time()) - started)


def _sharded(listing: pa.Table, first_shard: int, shard_size: int) -> pa.Table:
    """The listing with a ``shard`` column: consecutive runs of ``shard_size`` rows from ``first_shard``."""
    shards = first_shard + np.arange(listing.num_rows) // shard_size
    return listing.append_column("shard", pa.array(shards, pa.int32()))


def _write_listing(path: Path, listing: pa.Table) -> None:
    # atomic: a crash leaves the old listing or the new one, never a partial file
    tmp = path.with_name(".listing.tmp")
    pq.write_table(listing, tmp)
    os.replace(tmp, path)


def _add_new_inputs(path: Path, fresh: pa.Table, shard_size: int, progress: bool) -> int:
    """Append the inputs of ``fresh`` whose image_id the frozen listing lacks, as new shards.

    Inputs that disappeared from the source stay in the run (their results are history).
    Returns how many inputs were added.
    """
    listing = pq.read_table(path)
    known = listing.column("image_id")
    added = fresh.filter(pc.invert(pc.is_in(fresh.column("image_id"), value_set=known)))
    if added.num_rows:
        first = int(pc.max(listing.column("shard")).as_py()) + 1 if listing.num_rows else 0
        added = _sharded(added, first, shard_size).cast(listing.schema)
        _write_listing(path, pa.concat_tables([listing, added]))
    if progress:
        print(f"[lrpscale] {added.num_rows} new inputs since the run's listing ({listing.num_rows} listed before)",
              file=sys.stderr)
    return added.num_rows


def _committed_counts(run: RunDirectory) -> dict[str, int]:
    def rows(table: str) -> int:
        folder = run.table(table)
        return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("part-*.parquet")) if folder.is_dir() else 0

    return {"ok": rows("images"), "errors": rows("errors")}


def _config_dict(config: RunConfig) -> dict:
    out = asdict(config)
    out["analysis"] = config.analysis.to_dict()
    return out


def _versions() -> dict:
    import ray

    return {"lrpscale": __version__, "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}
