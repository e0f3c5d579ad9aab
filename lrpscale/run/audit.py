"""The dataset audit on Ray: list once, decode in CPU tasks, analyse in a pool of model replicas
that write their results where they are made, commit shard by shard.

Exactly once, by per-shard commits (``lrpscale.storage.store``): the listing is frozen into the
run on the first start and cut into shards. An actor analyses a whole shard and writes its file
in every table under a name unique to the attempt; the driver gets a small summary back and
writes the shard's marker naming those files, so no result row passes through the driver. A
shard without a marker is not part of the run: the files of its attempts are removed and it is
analysed again on the next start. Re-running a complete run does nothing unless ``overwrite``. This module knows no LRP
rule: the actor hands batches to the engine's ``Analyzer``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lrpscale import __version__
from lrpscale.config import RunConfig
from lrpscale.engine import faithfulness
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import layer_aliases, load_model
from lrpscale.inputs import decoding, sources
from lrpscale.locations import fetched, is_uri
from lrpscale.run.actor import AnalyzerActor, label_indices
from lrpscale.run.progress import Meter, ProgressCallback, log_progress
from lrpscale.run.session import default_actors, ensure_ray, storage_options
from lrpscale.storage import tables
from lrpscale.storage.store import RunStore, new_attempt

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2  # shards handed to one actor at once: one analysed while the next decodes
MAX_ATTEMPTS = 3         # tries of one shard before the run stops (an actor that died, a failed write)
STALL_SECONDS = 600.0    # actors dying with no shard committed for this long: the run stops instead of looping


def fingerprint(config: RunConfig, model_id: str) -> dict:
    """What makes two runs the same run (and a resume legal): model, input, analysis, size."""
    return {"model_id": model_id, "input": _input_location(config.input), "input_kind": config.input_kind,
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
    started = time.time()
    report = log_progress() if progress is True else (progress or None)
    store = RunStore(config.output)
    store.check_location(config.input)
    model = load_model(config.model, fetched(config.weights))
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
    store.discard_uncommitted()
    output = store.local_path() or store.location
    base = {"run_id": run_id, "fingerprint": key, "config": config.to_dict(),
            "model_id": model.lrpscale_model_id, "composite": config.analysis.composite,
            "layers": {name: alias for alias, name in layer_aliases(model).items()},
            "versions": _versions(), "input": _input_location(config.input), "images": listing.num_rows,
            "shards": len(all_shards), "created": (previous or {}).get("created", time.time())}
    if not pending:
        counts = _committed_counts(store)
        log.info("%s is already complete (%d images, %d errors); pass --overwrite to analyse again",
                 store.location, counts["ok"], counts["errors"])
        return RunSummary(output, run_id, listing.num_rows, counts["ok"], counts["errors"], 0.0, 0, True)
    store.write_json({**base, "status": "running", "started": started})

    ensure_ray(address)
    expected = {int(s): int(c) for s, c in zip(*np.unique(shard_ids, return_counts=True))}
    meter = Meter(listing.num_rows, sum(expected[s] for s in committed), report)
    first_result = _analyse_shards(store, listing, pending, expected, config, run_id, meter)
    removed = store.discard_uncommitted()  # what killed or retried attempts left
    if removed:
        log.info("removed %d files of attempts that were killed or retried", removed)
    counts = _committed_counts(store)
    seconds = time.time() - started
    analysed = sum(expected[s] for s in pending)
    store.write_json({**base, "status": "complete", "started": started, "finished": time.time(),
                      "seconds_last_start": seconds, "images_per_second_last_start": analysed / seconds,
                      "ok": counts["ok"], "errors": counts["errors"]})
    return RunSummary(output, run_id, listing.num_rows, counts["ok"], counts["errors"], seconds, analysed,
                      warmup_seconds=(first_result or time.time()) - started)


def _analyse_shards(store: RunStore, listing: pa.Table, pending: list[int], expected: dict[int, int],
                    config: RunConfig, run_id: str, meter: Meter) -> float | None:
    """Analyse the pending shards on a pool of actors and commit each as its summary arrives;
    returns when the first shard was committed (None if none was pending).

    Each shard is one unit of work: a CPU task decodes its listing rows (uint8 pixels cross the
    object store), an actor analyses them batch by batch and writes the shard's table files
    under a fresh attempt id, and returns a summary of a few hundred bytes. The driver writes the
    shard's marker naming exactly those files. At most ``IN_FLIGHT_PER_ACTOR`` shards per actor
    are out at once, so the next shard decodes while the current one is analysed. A shard whose
    actor died goes to another actor while Ray restarts that one (``_ActorPool``); one that fails
    otherwise (a decode worker crashed, a write failed) is tried again with a new attempt id, up
    to ``MAX_ATTEMPTS`` times. Actors that keep dying with nothing committed stop the run
    (``_ActorPool.resting``). A failed attempt's files are never committed.
    """
    import ray

    num_actors, resources = default_actors(config)
    # an actor whose process dies is restarted by Ray (loading its model again) when a slot is
    # free; meanwhile its shards go to the other actors
    actor_class = ray.remote(max_restarts=-1, **resources, **storage_options())(AnalyzerActor)
    actors = [actor_class.remote(config.model, config.weights, config.analysis.to_dict(), tf32=config.tf32,
                                 output=store.location, run_id=run_id, image_size=config.image_size,
                                 batch_size=config.batch_size) for _ in range(num_actors)]
    decode = ray.remote(num_cpus=1, **storage_options())(decoding.decode_rows)
    # the listing is in shard order (shards are consecutive runs of rows); each shard a zero-copy slice
    shard_ids = listing.column("shard").to_numpy()
    order = np.argsort(shard_ids, kind="stable")
    start_of = dict(zip(pending, np.searchsorted(shard_ids[order], pending).tolist()))

    pool = _ActorPool(num_actors)
    queue, in_flight, tries = deque(pending), {}, defaultdict(int)
    first_result = None
    try:
        while queue or in_flight:
            while queue and (target := pool.next()) is not None:
                shard = queue.popleft()
                rows = listing.take(order[start_of[shard]:start_of[shard] + expected[shard]])
                decoded = decode.remote(rows, config.image_size, config.max_pixels)
                in_flight[actors[target].analyse_shard.remote(shard, decoded, new_attempt())] = (shard, target)
                pool.load[target] += 1
            if not in_flight:  # every actor is restarting: wait for the first to be tried again
                time.sleep(pool.wait_seconds())
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if not done:
                continue
            shard, target = in_flight.pop(done[0])
            pool.load[target] -= 1
            try:
                summary = ray.get(done[0])
                if summary["rows"] != expected[shard]:
                    raise RuntimeError(f"shard {shard}: {summary['rows']} result rows for {expected[shard]} inputs")
            except ray.exceptions.ActorUnavailableError:
                # the actor's process died and Ray is restarting it: not the shard's fault, so no try
                # is counted; the shard goes to another actor, this one rests before its next shard
                pool.resting(target)
                queue.appendleft(shard)
                continue
            except ray.exceptions.ActorDiedError as error:
                pool.dead(target, error)
                queue.appendleft(shard)
                continue
            except (ray.exceptions.RayError, RuntimeError) as error:
                tries[shard] += 1
                if tries[shard] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"shard {shard} failed {tries[shard]} times, last: {error}; "
                                       "run the same command again to resume") from error
                log.warning("shard %d failed (attempt %d of %d), submitting it again: %s", shard, tries[shard],
                            MAX_ATTEMPTS, str(error).splitlines()[0] if str(error) else type(error).__name__)
                queue.appendleft(shard)
                continue
            pool.worked(target)
            store.mark_committed(shard, summary["attempt"], summary["files"], summary["rows"],
                                 [summary["node"]] if summary["node"] else [])
            first_result = first_result or time.time()
            meter.update(summary["rows"], summary["errors"])
    finally:
        for actor in actors:  # also ends a restart still waiting for a slot
            ray.kill(actor)
    return first_result


class _ActorPool:
    """Which actor gets the next shard: the least loaded of those not resting, at most
    ``IN_FLIGHT_PER_ACTOR`` shards each. An actor whose call found it restarting rests, 1 s
    then twice as long each time up to 30 s, so shards flow to the others meanwhile."""

    def __init__(self, size: int):
        self.load = [0] * size
        self.not_before = [0.0] * size
        self.pause = [1.0] * size
        self.gone: dict[int, Exception] = {}
        self.deaths = 0                # actor deaths since the last committed shard
        self.progress = time.time()    # when a shard was last committed (or the pool started)

    def next(self) -> int | None:
        now = time.time()
        ready = [i for i in range(len(self.load)) if i not in self.gone and self.not_before[i] <= now
                 and self.load[i] < IN_FLIGHT_PER_ACTOR]
        return min(ready, key=self.load.__getitem__) if ready else None

    def wait_seconds(self) -> float:
        waits = [self.not_before[i] - time.time() for i in range(len(self.load)) if i not in self.gone]
        return min(max(0.05, min(waits)), 30.0)

    def resting(self, actor: int) -> None:
        """An actor's process died (Ray restarts it). Raises RuntimeError when actors have died at
        least ``MAX_ATTEMPTS`` times each with no shard committed for ``STALL_SECONDS``: restarts
        that never get a shard done (a replica that runs out of memory on every shard, say) would
        otherwise go on for ever, since Ray restarts the actors without limit."""
        self.not_before[actor] = time.time() + self.pause[actor]
        self.pause[actor] = min(2 * self.pause[actor], 30.0)
        self.deaths += 1
        stalled = time.time() - self.progress
        if self.deaths >= MAX_ATTEMPTS * len(self.load) and stalled >= STALL_SECONDS:
            raise RuntimeError(f"the analyser actors died {self.deaths} times in {stalled:.0f} s without committing a "
                               "shard (out of memory, a crash in native code, or lost nodes): stopping instead of "
                               "restarting them for ever; the committed shards are kept. Lower --batch-size or give "
                               "each actor more memory (--actor-resources), then run the same command to resume")

    def worked(self, actor: int) -> None:
        self.pause[actor] = 1.0
        self.deaths, self.progress = 0, time.time()

    def dead(self, actor: int, error: Exception) -> None:
        """An actor Ray will not restart (its constructor failed, or its restarts ran out)."""
        self.gone[actor] = error
        if len(self.gone) == len(self.load):
            raise RuntimeError(f"every analyser actor died, the last: {error}") from error
        log.warning("an analyser actor died and will not come back (%s); going on with %d",
                    str(error).splitlines()[0], len(self.load) - len(self.gone))


def _input_location(spec: str) -> str:
    """The input as recorded in run.json: a local path made absolute, a URI as given."""
    return spec if is_uri(spec) else os.path.abspath(spec)


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
