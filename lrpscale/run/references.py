"""Reference images per neuron on Ray (docs/method.md §18, "Reference images"): the images chosen by
``lrpscale.results.references`` are decoded in CPU tasks from the run's listing, their
channel-conditional heatmaps computed and cropped on analyser actors (``AnalyzerActor
.conditional_heatmaps``, one model replica each), and the driver writes ``classes/references.parquet``.

    summary = run_references("runs/audit")      # also run by `lrpscale strategies` (--no-references skips it)

Cost: one conditional heatmap per distinct (image, layer, neuron) among the chosen rows, at most
``images`` x (neurons + (neuron, class) pairs); the images of one layer share a forward pass.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lrpscale.config import RunConfig
from lrpscale.inputs import decoding
from lrpscale.results.references import (
    REFERENCE_SETTINGS,
    REFERENCES,
    ReferenceSettings,
    channel_layer,
    choose_references,
    reference_crop,
    reference_neurons,
    references_table,
    write_references,
)
from lrpscale.run.progress import gather
from lrpscale.run.session import default_actors, ensure_ray, storage_options
from lrpscale.storage.store import CLASSES, RunStore

log = logging.getLogger(__name__)
IMAGES_PER_TASK = 64  # chosen images decoded and explained as one unit of work


@dataclass
class ReferencesSummary:
    """What ``run_references`` did: rows written, distinct neurons, conditional heatmaps computed,
    images decoded (and how many of them no longer decode), seconds, where the table went."""

    rows: int
    neurons: int
    heatmaps: int
    images: int
    failed_images: int
    seconds: float
    location: Path | str

    def text(self) -> str:
        failed = f", {self.failed_images} no longer decode" if self.failed_images else ""
        return (f"references: {self.rows} reference images of {self.neurons} neurons ({self.heatmaps} conditional "
                f"heatmaps of {self.images} images{failed}, {self.seconds:.0f} s): {self.location}\n")


def remove_references(store: RunStore) -> None:
    """Delete a run's references (settings file first, so a reader never sees a half-removed table):
    they belong to the strategies they were chosen for."""
    for name in (REFERENCE_SETTINGS, REFERENCES):
        if store.is_file(CLASSES, name):
            store.fs.delete_file(store.path(CLASSES, name))


def run_references(run: str | Path | RunStore, address: str | None = None,
                   settings: ReferenceSettings | None = None) -> ReferencesSummary:
    """Reference images for the neurons ``reference_neurons`` names (the run's strategies and, when
    reduced, its classes' most frequent swept-layer neurons): ``choose_references`` picks them, the
    actors compute ``explain(x, restrict={layer: [neuron]})`` for the run's stored target and crop it
    (``reference_crop``), then ``classes/references.parquet`` and ``references.json`` are written.
    Ray is joined at ``address`` / RAY_ADDRESS or started locally."""
    settings = settings or ReferenceSettings()
    store = run if isinstance(run, RunStore) else RunStore(run)
    info = store.read_json()
    if info is None:
        raise ValueError(f"{store.location} is not an lrpscale run (no run.json)")
    started = time.time()
    remove_references(store)
    layer = channel_layer(info)
    neurons = reference_neurons(store, settings.class_neurons, layer)
    chosen = choose_references(store, neurons, settings.images, layer)
    keys = chosen[["image_id", "layer", "neuron"]].drop_duplicates().sort_values(["image_id", "layer", "neuron"])
    crops = _crops(store, info, keys, settings, address) if len(keys) else {}
    table = references_table(chosen, crops)
    failed = keys["image_id"].nunique() - len({image_id for (image_id, _, _), crop in crops.items() if crop is not None})
    seconds = time.time() - started
    summary = ReferencesSummary(table.num_rows, len(chosen[["layer", "neuron"]].drop_duplicates()), len(keys),
                                keys["image_id"].nunique(), failed, seconds,
                                (store.local_path() / CLASSES / REFERENCES) if store.local_path()
                                else store.classes_path(REFERENCES))
    write_references(store, table, settings, {
        "channel_layer": layer, "time": time.time(), "seconds": seconds, "rows": summary.rows,
        "neurons": summary.neurons, "heatmaps": summary.heatmaps, "images": summary.images,
        "failed_images": failed})
    return summary


def _crops(store: RunStore, info: dict, keys: pd.DataFrame, settings: ReferenceSettings,
           address: str | None) -> dict[tuple[str, str, int], dict | None]:
    """(image_id, layer, neuron) -> its ``CROP`` value (None where the image no longer decodes),
    computed on a pool of analyser actors, ``IMAGES_PER_TASK`` images at a time."""
    import ray

    config = RunConfig.from_mapping(info["config"])
    image_ids = sorted(set(keys["image_id"]))
    listing = store.read_listing()
    rows = listing.filter(pc.is_in(listing.column("image_id"), value_set=pa.array(image_ids, pa.string())))
    targets = _targets(store, image_ids)
    rows = rows.append_column("target", pa.array([targets.get(i, -1) for i in rows.column("image_id").to_pylist()],
                                                  pa.int64()))
    rows = rows.filter(pc.greater_equal(rows.column("target"), 0))
    row_of = {image_id: i for i, image_id in enumerate(rows.column("image_id").to_pylist())}
    missing = [image_id for image_id in image_ids if image_id not in row_of]
    if missing:
        log.warning("%d chosen images are not in the listing (e.g. %s): no crops for them", len(missing), missing[0])
    from lrpscale.run.actor import AnalyzerActor  # torch: only a driver that computes references loads it

    ensure_ray(address)
    num_actors, resources = default_actors(config)
    tasks = [list(range(start, min(start + IMAGES_PER_TASK, rows.num_rows)))
             for start in range(0, rows.num_rows, IMAGES_PER_TASK)]
    num_actors = max(1, min(num_actors, len(tasks)))
    actor_class = ray.remote(**resources, **storage_options())(AnalyzerActor)
    actors = [actor_class.remote(config.model, config.weights, config.analysis.to_dict(), tf32=config.tf32,
                                 image_size=config.image_size, batch_size=config.batch_size)
              for _ in range(num_actors)]
    decode = ray.remote(num_cpus=1, **storage_options())(decoding.decode_rows)
    crop = functools.partial(reference_crop, threshold=settings.threshold, crop_pixels=settings.crop_pixels)
    by_image = keys.groupby("image_id", sort=False)
    names, calls = [], []
    try:
        for number, task in enumerate(tasks):
            part = rows.take(task)
            requests, part_names = [], []
            for position, image_id in enumerate(part.column("image_id").to_pylist()):
                for layer, neuron in zip(by_image.get_group(image_id)["layer"], by_image.get_group(image_id)["neuron"]):
                    requests.append((position, layer, int(neuron)))
                    part_names.append((image_id, layer, int(neuron)))
            decoded = decode.remote(part, config.image_size, config.max_pixels)
            calls.append(actors[number % num_actors].conditional_heatmaps.remote(decoded, requests, crop))
            names.append(part_names)
        log.info("references: %d conditional heatmaps of %d images on %d actors", len(keys), rows.num_rows, num_actors)
        out = {}
        for part_names, crops in zip(names, gather(calls, "references: parts done")):
            out.update(zip(part_names, crops))
    finally:
        for actor in actors:
            ray.kill(actor)
    failed = sorted({name[0] for name, crop in out.items() if crop is None})
    if failed:
        log.warning("%d chosen images no longer decode (e.g. %s; their file changed since the run): no crops for them",
                    len(failed), failed[0])
    return out


def _targets(store: RunStore, image_ids: list[str]) -> dict[str, int]:
    """image_id -> the class its stored heatmap explains (the images table's ``target``)."""
    files = store.committed_files("images")
    if not files:
        return {}
    table = ds.dataset(files, format="parquet", filesystem=store.fs).to_table(
        columns=["image_id", "target"], filter=ds.field("image_id").isin(image_ids))
    return dict(zip(table.column("image_id").to_pylist(), table.column("target").to_pylist()))

