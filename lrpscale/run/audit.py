"""The dataset audit on Ray: list once, decode in CPU tasks, analyse in a pool of model replicas,
commit results shard by shard.

Exactly once, by per-shard commits (``lrpscale.storage.store``): the listing is frozen into the
run on the first start and cut into shards. The driver collects each shard's result rows and,
once the shard is complete, commits its file in every table and then its marker. A shard without
a marker is not part of the run: its files are removed and it is analysed again on the next
start. Re-running a complete run does nothing unless ``overwrite``. This module knows no LRP
rule: the actor hands batches to the engine's ``Analyzer``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lrpscale import __version__
from lrpscale.config import RunConfig
from lrpscale.engine import faithfulness
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import input_normalization, layer_aliases, load_model
from lrpscale.inputs import decoding, sources
from lrpscale.run.actor import AnalyzerActor, label_indices
from lrpscale.run.progress import Meter, ProgressCallback, log_progress
from lrpscale.run.session import default_actors, ensure_ray
from lrpscale.storage import tables
from lrpscale.storage.store import RunStore

log = logging.getLogger(__name__)


def fingerprint(config: RunConfig, model_id: str) -> dict:
    """What makes two runs the same run (and a resume legal): model, input, analysis, size."""
    return {"model_id": model_id, "input": os.path.abspath(config.input), "input_kind": config.input_kind,
            "image_size": config.image_size, "analysis": config.analysis.to_dict(),
            "schema_version": tables.SCHEMA_VERSION}


def run_id_for(run_key: dict) -> str:
    """Stable id of a run from its ``fingerprint``: model weights, analysis config, schema and
    code version (not the input: re-analysis adds new images to the same run)."""
    hashed = {k: v for k, v in run_key.items() if k not in ("input", "input_kind")}
    hashed["lrpscale"] = __version__
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RunSummary:
    """What one start of an audit did: where the run is (a Path when local), its id, the inputs
    listed, the images and errors committed in all, and what this start analysed and how fast."""

    output: Path | str
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


def run_audit(config: RunConfig, address: str | None = None, overwrite: bool = False,
              progress: bool | ProgressCallback = True, new_inputs: bool = False) -> RunSummary:
    """Analyse every input of ``config.input`` into the run at ``config.output``.

    progress: True logs a line every few seconds, False stays quiet, a callable receives every
    ``Progress``. new_inputs: list the input again and add the images that appeared since the
    run's listing was frozen, as new shards (images already listed keep their shard, so each
    stays once). Everything that can be checked (the output location, the model, the existing
    run) is checked before Ray starts.
    """
    import ray

    started = time.time()
    report = log_progress() if progress is True else (progress or None)
    store = RunStore(config.output)
    store.check_location(config.input)
    model = load_model(config.model, config.weights)
    mean, std = input_normalization(model)
    config = replace(config, image_size=config.image_size or model.lrpscale_image_size)
    try:  # unknown layer names and perturbation settings too coarse for the image fail here, not in every actor
        Analyzer(model, config.analysis)
        if config.analysis.faithfulness_sample:
            faithfulness.check_settings(config.image_size, config.analysis.faithfulness_patch_size,
                                        config.analysis.faithfulness_steps, config.analysis.faithfulness_fraction)
    except (KeyError, ValueError) as error:
        raise ValueError(f"analysis: {error.args[0] if error.args else error}") from None
    key = fingerprint(config, model.lrpscale_model_id)
    run_id = run_id_for(key)
    previous = store.read_json()
    if previous and (overwrite or previous.get("fingerprint") != key):
        if not overwrite and store.committed():
            raise RuntimeError(f"{store.location} holds a run with another model, input or configuration "
                               f"(run {previous.get('run_id')}); choose another --output or pass --overwrite")
        if not overwrite:
            log.info("%s: run %s committed nothing; starting again with this configuration",
                     store.location, previous.get("run_id"))
        store.remove()
        previous = None

    if not store.has_listing():
        listing = _sharded(_list(config), 0, config.shard_size)
        check_labels(listing, model, config.analysis.target)
        store.write_listing(listing)
    elif new_inputs:
        _add_new_inputs(store, _list(config), config.shard_size)
    listing = store.read_listing()
    shard_ids = listing.column("shard").to_numpy()
    all_shards = set(np.unique(shard_ids).tolist())
    committed = store.committed() & all_shards
    pending = sorted(all_shards - committed)
    store.discard_uncommitted(set(pending))
    output = store.local_path() or store.location
    base = {"run_id": run_id, "fingerprint": key, "config": config.to_dict(),
            "model_id": model.lrpscale_model_id, "composite": config.analysis.composite,
            "layers": {name: alias for alias, name in layer_aliases(model).items()},
            "versions": _versions(), "input": os.path.abspath(config.input), "images": listing.num_rows,
            "shards": len(all_shards), "created": (previous or {}).get("created", time.time())}
    if not pending:
        counts = _committed_counts(store)
        log.info("%s is already complete (%d images, %d errors); pass --overwrite to analyse again",
                 store.location, counts["ok"], counts["errors"])
        return RunSummary(output, run_id, listing.num_rows, counts["ok"], counts["errors"], 0.0, 0, True)
    store.write_json({**base, "status": "running", "started": started})

    ensure_ray(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    num_actors, resources = default_actors(config)
    expected = {int(s): int(c) for s, c in zip(*np.unique(shard_ids, return_counts=True))}
    pending_set = set(pending)
    todo = listing.filter(pa.array(np.isin(shard_ids, pending)))
    blocks = [todo.slice(offset, config.shard_size) for offset in range(0, todo.num_rows, config.shard_size)]
    dataset = ray.data.from_arrow(blocks)
    dataset = dataset.map_batches(decoding.load_batch, batch_size=config.shard_size, batch_format="numpy", num_cpus=1,
                                  fn_kwargs={"image_size": config.image_size, "mean": mean, "std": std,
                                             "max_pixels": config.max_pixels})
    dataset = dataset.map_batches(
        AnalyzerActor, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": config.model, "weights": config.weights,
                               "analysis": config.analysis.to_dict(), "tf32": config.tf32},
        compute=ray.data.ActorPoolStrategy(size=num_actors), **resources)

    pieces: dict[int, list[pa.Table]] = defaultdict(list)
    seen: dict[int, set[str]] = defaultdict(set)
    meter = Meter(listing.num_rows, sum(expected[s] for s in committed), report)
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
                shard_tables = tables.split_result(result, side, deconv_side, config.analysis.deconv_mode,
                                                   model.lrpscale_model_id, run_id, config.analysis.composite)
                nodes = pc.unique(result.column("node_id")).drop_null().to_pylist()
                store.commit(shard, shard_tables, result.num_rows, nodes)
                pending_set.discard(shard)
                del seen[shard]
    if pending_set:
        raise RuntimeError(f"shards {sorted(pending_set)} did not complete; run the same command again to resume")
    counts = _committed_counts(store)
    seconds = time.time() - started
    analysed = sum(expected[s] for s in pending)
    store.write_json({**base, "status": "complete", "started": started, "finished": time.time(),
                      "seconds_last_start": seconds, "images_per_second_last_start": analysed / seconds,
                      "ok": counts["ok"], "errors": counts["errors"]})
    return RunSummary(output, run_id, listing.num_rows, counts["ok"], counts["errors"], seconds, analysed,
                      warmup_seconds=(first_result or time.time()) - started)


def check_labels(listing: pa.Table, model, target: str) -> None:
    """With ``target="label"``, refuse an input none of whose labels is a class of the model (every
    image would fail the same way), naming the labels found and the model's classes; warn when
    only some are not (those images become error rows)."""
    if target != "label":
        return
    listed = listing.filter(pc.is_null(listing.column("error_stage")))
    labels = sorted({label for label in listed.column("label").to_pylist()}, key=lambda v: (v is None, str(v)))
    indices = label_indices(labels, model.lrpscale_classes, model.classifier[-1].out_features)
    unknown = [label for label, index in zip(labels, indices) if index is None]
    classes = model.lrpscale_classes or [str(i) for i in range(model.classifier[-1].out_features)]
    shown = ", ".join(map(repr, classes[:10])) + (f", ... ({len(classes)} classes)" if len(classes) > 10 else "")
    if labels == [None]:
        raise ValueError("--target label, but the input has no labels (a folder's images must sit in class "
                         "subfolders; a manifest needs a label column); pass --target pred")
    if len(unknown) == len(labels):
        found = ", ".join(map(repr, labels[:10])) + (f", ... ({len(labels)} labels)" if len(labels) > 10 else "")
        raise ValueError(f"--target label, but none of the input's labels ({found}) is a class of the model "
                         f"({shown}); name the class folders as the model's classes, or pass --target pred")
    if unknown:
        log.warning("%d labels are not classes of the model (%s): their images become error rows",
                    len(unknown), ", ".join(map(repr, unknown[:5])))


def _list(config: RunConfig) -> pa.Table:
    return sources.list_inputs(config.input, config.input_kind, follow_external_links=config.follow_external_links)


def _sharded(listing: pa.Table, first_shard: int, shard_size: int) -> pa.Table:
    """The listing with a ``shard`` column: consecutive runs of ``shard_size`` rows from ``first_shard``."""
    shards = first_shard + np.arange(listing.num_rows) // shard_size
    return listing.append_column("shard", pa.array(shards, pa.int32()))


def _add_new_inputs(store: RunStore, fresh: pa.Table, shard_size: int) -> int:
    """Append the inputs of ``fresh`` whose image_id the frozen listing lacks, as new shards.

    Inputs that disappeared from the source stay in the run (their results are history).
    Returns how many inputs were added.
    """
    listing = store.read_listing()
    known = listing.column("image_id")
    added = fresh.filter(pc.invert(pc.is_in(fresh.column("image_id"), value_set=known)))
    if added.num_rows:
        first = int(pc.max(listing.column("shard")).as_py()) + 1 if listing.num_rows else 0
        added = _sharded(added, first, shard_size).cast(listing.schema)
        store.write_listing(pa.concat_tables([listing, added]))
    log.info("%d new inputs since the run's listing (%d listed before)", added.num_rows, listing.num_rows)
    return added.num_rows


def _committed_counts(store: RunStore) -> dict[str, int]:
    return {"ok": store.committed_rows("images"), "errors": store.committed_rows("errors")}


def _versions() -> dict:
    import ray
    import torch

    return {"lrpscale": __version__, "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}
