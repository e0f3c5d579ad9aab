"""Synthetic runs of ImageNet size, written through the real schema and writer, to measure what a
run of 1.28M images costs on disk, in the reducer and in an auditor's queries without analysing it.

Each image gets what a real VGG16 224x224 analysis at ``AnalysisConfig`` defaults gives it:
24 + k* neurons (four per path layer, k* at conv5_3), 8 scores (4 k x 2 variants at conv5_3),
68 + 8 min(k*, 4) critical-path edges and one deconvolution (3x32x32), a 56x56 heatmap and the
512 channel relevances of conv5_3.
``row_counts`` is that rule; tests check it against a real ``Analyzer``. Values are shaped like
real ones where it matters for compression and for the reducer: heatmaps and reconstructions
are smooth blobs with some texture (not white noise), each class prefers its own neurons (so
class graphs are non-trivial), the fidelity SMAPE falls with k and sets k*. The listing is an
ImageNet-style folder listing (``n01440764/n01440764_10026.JPEG``), sorted by class as a folder
walk is, cut into shards of 256 and committed shard by shard (``tables.split_result`` then
``RunStore.commit``), with ``_listing.parquet`` and ``run.json`` as ``run_audit`` writes them.

    python -m lrpscale.run.synthetic /tmp/run --images 1281167 --processes 2
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrpscale.config import AnalysisConfig, RunConfig
from lrpscale.inputs import sources
from lrpscale.run.audit import _versions, fingerprint, run_id_for
from lrpscale.run.sampling import in_sample
from lrpscale.storage import tables
from lrpscale.storage.store import LISTING, RunStore

log = logging.getLogger(__name__)
IMAGENET_TRAIN = 1_281_167
MODEL_ID = "vgg16:synthetic"
# VGG16 (torchvision names): the path layers bottom to top with their widths, and the swept layer
PATH_LAYERS = (("features.2", 64), ("features.7", 128), ("features.14", 256), ("features.21", 512),
               ("features.28", 512), ("classifier.0", 4096), ("classifier.3", 4096))
SWEPT = "features.28"
VARIANTS = ("fidelity", "forward_backward")
# k* of a trained model is not known here; a random-weight VGG16 always ends at k = 64 (worst case
# for storage), so most images get large k and some never reach the SMAPE target
K_STAR_PROBABILITIES = {1: 0.05, 4: 0.15, 16: 0.30, 64: 0.50}
PREFERRED = 12        # neurons per (class, layer) that the class selects most often
PREFERENCE = 0.8      # chance that a selected neuron comes from its class's preferred ones
ACCURACY = 0.75


def row_counts(k_star: np.ndarray, config: AnalysisConfig | None = None, path_layers: int = 7) -> dict:
    """Rows per image in each flat table for a VGG (sweeping one path layer) at ``config``.

    k_star: (N,) chosen k at the swept layer. Neurons: path_k at every other path layer, k* at
    the swept one. Edges: every (lower, upper) pair of consecutive path layers, with the swept
    layer contributing min(k*, path_k) neurons, plus the top layer's neurons to the output.
    """
    config = config or AnalysisConfig()
    k_star = np.asarray(k_star)
    p, path_at_swept = config.path_k, np.minimum(k_star, config.path_k)
    layers = len(config.sweep_layers or [SWEPT])
    return {"neurons": (path_layers - 1) * p + k_star,
            # two pairs touch the swept layer (conv4_3-conv5_3, conv5_3-fc6), path_layers - 3 do not
            "edges": (path_layers - 3) * p * p + 2 * p * path_at_swept + p,
            "scores": np.full_like(k_star, layers * len(config.ks) * len(VARIANTS)),
            "deconv": np.full_like(k_star, config.deconv_per_layer)}


def imagenet_listing(images: int = IMAGENET_TRAIN, classes: int = 1000, seed: int = 0,
                     root: str = "/data/imagenet/train") -> tuple[pa.Table, list[str]]:
    """An ImageNet-style folder listing (``sources.LISTING_SCHEMA``), sorted as a folder walk is, and
    the class names (wnids, sorted). Class sizes vary as ImageNet's do (most 1,300, some ~730)."""
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{v:08d}" for v in rng.choice(np.arange(1_000_000, 15_000_000), classes, replace=False))
    weights = np.where(rng.random(classes) < 0.88, 1.0, rng.uniform(0.56, 1.0, classes))
    counts = np.floor(weights / weights.sum() * images).astype(np.int64)
    counts[: images - counts.sum()] += 1
    ids = []
    for wnid, count in zip(wnids, counts):
        numbers = rng.choice(np.arange(1, max(16_000, 2 * count)), count, replace=False)
        ids.extend(sorted(f"{wnid}/{wnid}_{n}.JPEG" for n in numbers))
    uris = [f"{root}/{i}" for i in ids]
    label = np.repeat(np.asarray(wnids, dtype=object), counts)
    n = len(ids)
    empty = pa.nulls(n, pa.string())
    listing = pa.table({"image_id": ids, "uri": uris, "label": label, "source": pa.array(["folder"] * n),
                        "path": uris, "member": pa.array([""] * n), "row": np.full(n, -1), "offset": np.full(n, -1),
                        "size": np.full(n, -1), "error_stage": empty, "error_type": empty, "error_message": empty},
                       schema=sources.LISTING_SCHEMA)
    return listing, wnids


def _blobs(rng: np.random.Generator, n: int, side: int, channels: int = 1, blobs: int = 5) -> np.ndarray:
    """(n, channels, side, side) float32: a few Gaussian blobs (mostly positive) times a texture,
    the look of an LRP heatmap of an object, not white noise."""
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side
    cy, cx = rng.uniform(0.15, 0.85, (2, n, 1, blobs)).astype(np.float32)
    width = rng.uniform(0.04, 0.18, (n, 1, blobs)).astype(np.float32)
    sign = np.where(rng.random((n, channels, blobs)) < 0.8, 1.0, -0.4).astype(np.float32)
    amplitude = rng.lognormal(0.0, 0.5, (n, channels, blobs)).astype(np.float32) * sign
    gy = np.exp(-((grid[None, :, None] - cy) ** 2) / (2 * width ** 2))          # (n, side, blobs)
    gx = np.exp(-((grid[None, :, None] - cx) ** 2) / (2 * width ** 2))
    smooth = np.einsum("ncb,nyb,nxb->ncyx", amplitude, gy, gx, optimize=True)
    texture = 1.0 + 0.35 * rng.standard_normal((n, channels, side, side)).astype(np.float32)
    return smooth * texture


def _scaled(pictures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``tables.scaled_float16`` for a stack: (n, ...) -> (n, size) float16 and (n,) scales."""
    flat = pictures.reshape(len(pictures), -1)
    scale = np.abs(flat).max(1)
    safe = np.where(scale > 0, scale, 1)
    return (flat / safe[:, None]).astype(np.float16), scale.astype(np.float32)


def _preferences(seed: int, classes: int) -> list[np.ndarray]:
    """Per path layer, (classes, width) log-weights: each class prefers PREFERRED neurons, Zipf-like."""
    out = []
    for layer, (_, width) in enumerate(PATH_LAYERS):
        rng = np.random.default_rng([seed, 7, layer])
        logw = np.zeros((classes, width), np.float32)
        picks = np.argsort(rng.random((classes, width)), axis=1)[:, :PREFERRED]
        base = np.log(PREFERENCE / (1 - PREFERENCE) * width / PREFERRED)
        zipf = np.log(PREFERRED / np.arange(1, PREFERRED + 1) / np.sum(1 / np.arange(1, PREFERRED + 1)))
        np.put_along_axis(logw, picks, (base + zipf).astype(np.float32)[None, :], axis=1)
        out.append(logw)
    return out


def _list_array(counts: np.ndarray, columns: dict[str, pa.Array], item: pa.StructType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    items = pa.StructArray.from_arrays([columns[item.field(i).name] for i in range(item.num_fields)],
                                       fields=list(item))
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def shard_result(listing: pa.Table, shard: int, label_index: np.ndarray, wnids: list[str],
                 preferences: list[np.ndarray], seed: int = 0, config: AnalysisConfig | None = None) -> pa.Table:
    """One shard's ``tables.RESULT`` rows for the listing rows given, built column-wise."""
    config = config or AnalysisConfig()
    rng = np.random.default_rng([seed, shard])
    n = listing.num_rows
    classes = len(wnids)
    correct = rng.random(n) < ACCURACY
    pred = np.where(correct, label_index, rng.integers(0, classes, n)).astype(np.int32)
    logit = rng.normal(16.0, 4.0, n).clip(2).astype(np.float32)
    prob = np.where(correct, rng.beta(6, 2, n), rng.beta(2, 5, n)).astype(np.float32)
    conservation = rng.lognormal(np.log(2e-5), 0.7, n).astype(np.float32)
    rel_total = (logit * (1 + conservation * rng.choice([-1, 1], n))).astype(np.float32)
    rel_neg = -(np.abs(rel_total) * rng.uniform(0.2, 0.8, n)).astype(np.float32)
    rel_pos = (rel_total - rel_neg).astype(np.float32)

    heat, heat_scale = _scaled(_blobs(rng, n, config.heatmap_size))
    heat_scale *= rel_pos / (config.heatmap_size ** 2) * 20

    ks = np.asarray(config.ks)
    k_star = rng.choice(ks, n, p=[K_STAR_PROBABILITIES.get(int(k), 0) for k in ks]
                        if set(ks.tolist()) == set(K_STAR_PROBABILITIES) else None)
    counts = row_counts(k_star, config, len(PATH_LAYERS))

    # selected neurons per path layer: a Gumbel top-k over the class's log-weights (distinct neurons)
    p = config.path_k
    k_max = int(ks.max())
    chosen, valid, relevance, activation, ranks, layer_names = [], [], [], [], [], []
    for index, (layer, width) in enumerate(PATH_LAYERS):
        take = k_max if layer == SWEPT else p
        keys = preferences[index][label_index] + rng.gumbel(size=(n, width)).astype(np.float32)
        top = np.argpartition(-keys, take - 1, axis=1)[:, :take]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)
        if layer == SWEPT:
            swept_keys = keys
        count = k_star if layer == SWEPT else np.full(n, p)
        rank = np.arange(take)[None, :].repeat(n, 0)
        chosen.append(top)
        valid.append(rank < count[:, None])
        decay = rng.uniform(0.05, 0.3, (n, 1))
        relevance.append(rel_total[:, None] * decay * np.exp(-rank * decay))
        activation.append(rng.lognormal(np.log(3e4 / 2 ** (2 * index)), 0.6, (n, take)) * np.exp(-0.05 * rank))
        ranks.append(rank)
        layer_names.append(np.full((n, take), index))
    cat = lambda parts: np.concatenate(parts, axis=1)  # noqa: E731 (layers side by side, per image)
    mask = cat(valid)
    layer_of = cat(layer_names)[mask]
    names = pa.array([name for name, _ in PATH_LAYERS], pa.string())
    neurons = _list_array(counts["neurons"], {
        "layer": pa.DictionaryArray.from_arrays(pa.array(layer_of, pa.int32()), names).cast(pa.string()),
        "neuron": pa.array(cat(chosen)[mask], pa.int32()), "rank": pa.array(cat(ranks)[mask], pa.int16()),
        "relevance": pa.array(cat(relevance)[mask], pa.float32()),
        "activation": pa.array(cat(activation)[mask], pa.float32())}, tables._NEURON)

    # scores: the fidelity SMAPE falls with k and first reaches the target at k*; at k* = max k
    # a third of the images never reach it (the worst-explained)
    position = np.searchsorted(ks, k_star)
    steps = np.arange(len(ks))[None, :]
    above = config.score_target + rng.uniform(5, 60, (n, len(ks))) * (position[:, None] - steps)
    below = config.score_target * rng.uniform(0.4, 1.0, (n, len(ks))) * 0.85 ** (steps - position[:, None])
    fidelity = np.where(steps < position[:, None], above, below)
    failed = (k_star == ks[-1]) & (rng.random(n) < 1 / 3)
    fidelity[failed] = config.score_target + rng.uniform(5, 130, (int(failed.sum()), 1)) * 0.9 ** steps[:, ::-1]
    fidelity = fidelity.clip(0, 200)
    forward = rng.uniform(15, 60, (n, len(ks)))
    smape = np.stack([fidelity, forward], 1)                                  # (n, variant, k)
    mse = np.stack([fidelity * 1e-11, forward * 2e-4], 1) * rng.lognormal(0, 0.3, (n, 2, len(ks)))
    flat = lambda a: a.reshape(n * len(VARIANTS) * len(ks))  # noqa: E731
    is_chosen = np.broadcast_to((ks[None, None, :] == k_star[:, None, None]), (n, len(VARIANTS), len(ks)))
    scores = _list_array(counts["scores"], {
        "layer": pa.array([SWEPT] * (n * len(VARIANTS) * len(ks)), pa.string()),
        "k": pa.array(np.tile(ks, n * len(VARIANTS)), pa.int32()),
        "variant": pa.array(np.tile(np.repeat(VARIANTS, len(ks)), n), pa.string()),
        "mse": pa.array(flat(mse), pa.float32()), "smape": pa.array(flat(smape), pa.float32()),
        "chosen": pa.array(flat(np.ascontiguousarray(is_chosen)))}, tables._SCORE)

    # edges between consecutive path layers, for each upper neuron j every lower neuron i
    path_count = [np.minimum(k_star, p) if layer == SWEPT else np.full(n, p) for layer, _ in PATH_LAYERS]
    lower_ids, upper_ids, lower_layer, upper_layer, edge_valid = [], [], [], [], []
    for lo in range(len(PATH_LAYERS) - 1):
        up = lo + 1
        j, i = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
        j, i = j.ravel(), i.ravel()
        lower_ids.append(chosen[lo][:, i])
        upper_ids.append(chosen[up][:, j])
        edge_valid.append((i[None, :] < path_count[lo][:, None]) & (j[None, :] < path_count[up][:, None]))
        lower_layer.append(np.full((n, p * p), lo))
        upper_layer.append(np.full((n, p * p), up))
    top = len(PATH_LAYERS) - 1
    lower_ids.append(chosen[top][:, :p])
    upper_ids.append(pred[:, None].repeat(p, 1))
    edge_valid.append(np.ones((n, p), bool))
    lower_layer.append(np.full((n, p), top))
    upper_layer.append(np.full((n, p), top + 1))
    edge_mask = cat(edge_valid)
    edge_names = pa.array([name for name, _ in PATH_LAYERS] + ["output"], pa.string())
    edge_relevance = (rel_total[:, None] * rng.lognormal(np.log(0.02), 1.0, edge_mask.shape)
                      * np.where(rng.random(edge_mask.shape) < 0.9, 1, -1))
    as_names = lambda codes: pa.DictionaryArray.from_arrays(  # noqa: E731
        pa.array(codes[edge_mask], pa.int32()), edge_names).cast(pa.string())
    edges = _list_array(counts["edges"], {
        "layer_from": as_names(cat(lower_layer)), "neuron_from": pa.array(cat(lower_ids)[edge_mask], pa.int32()),
        "layer_to": as_names(cat(upper_layer)), "neuron_to": pa.array(cat(upper_ids)[edge_mask], pa.int32()),
        "relevance": pa.array(edge_relevance[edge_mask], pa.float32())}, tables._EDGE)

    # one deconvolution per image: the top conv5_3 neuron, (3, d, d)
    side = config.deconv_size
    picture, picture_scale = _scaled(_blobs(rng, n, side, channels=3, blobs=4))
    swept = [name for name, _ in PATH_LAYERS].index(SWEPT)
    deconv = _list_array(counts["deconv"], {
        "layer": pa.array([SWEPT] * n, pa.string()), "neuron": pa.array(chosen[swept][:, 0], pa.int32()),
        "scale": pa.array(picture_scale), "reconstruction": pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * 3 * side * side), pa.array(picture.ravel()))},
        tables._DECONV)

    faithfulness = _perturbation_curves(rng, listing.column("image_id").to_pylist(), logit, prob, config)
    channel_lists = _channel_relevance(rng, swept_keys, k_max)

    heat_lists = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * heat.shape[1]),
                                          pa.array(heat.ravel()))
    wnid_array = np.asarray(wnids, dtype=object)
    columns = {
        "image_id": listing.column("image_id"), "uri": listing.column("uri"), "label": listing.column("label"),
        "label_index": pa.array(label_index, pa.int32()), "pred": pa.array(pred),
        "pred_label": pa.array(wnid_array[pred], pa.string()), "target": pa.array(pred), "logit": pa.array(logit),
        "prob": pa.array(prob), "rel_total": pa.array(rel_total), "rel_pos": pa.array(rel_pos),
        "rel_neg": pa.array(rel_neg), "conservation_error": pa.array(conservation),
        "heatmap_scale": pa.array(heat_scale.astype(np.float32)), "shard": pa.array(np.full(n, shard, np.int32)),
        "heatmap": heat_lists, "channel_relevance": channel_lists, "neurons": neurons, "scores": scores, "edges": edges,
        "deconv": deconv,
        "faithfulness": faithfulness, "error_stage": pa.nulls(n, pa.string()), "error_type": pa.nulls(n, pa.string()),
        "error_message": pa.nulls(n, pa.string()),
    }
    # fields this generator does not know (provenance added to RESULT later) stay null
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in tables.RESULT}, schema=tables.RESULT)


def _channel_relevance(rng: np.random.Generator, keys: np.ndarray, ranked: int) -> pa.Array:
    """The ``channel_relevance`` list column from the swept layer's selection keys (n, C): the
    magnitude exp(key) is heavy-tailed and largest for the selected neurons (as the top-ranked
    channels of a real analysis are), a fifth of the channels after the first ``ranked`` negative;
    divided by the sum of |values| and stored as float16, as ``tables.result_row`` stores a real
    record's."""
    n, width = keys.shape
    magnitude = np.exp(keys - keys.max(1, keepdims=True))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    negative = (rank >= ranked) & (rng.random((n, width)) < 0.2)
    values = np.where(negative, -magnitude, magnitude)
    values /= np.abs(values).sum(1, keepdims=True)
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width),
                                    pa.array(values.astype(np.float16).ravel()))


# how fast the target logit falls per unit of the image removed, by order: what a faithful heatmap gives
CURVE_RATES = {"morf": 4.0, "lerf": 0.5, "random": 1.5}


def _perturbation_curves(rng: np.random.Generator, image_ids: list[str], logit: np.ndarray, prob: np.ndarray,
                         config: AnalysisConfig) -> pa.Array:
    """The ``faithfulness`` list column: for the images of the seeded sample (``in_sample``, as the
    actor draws it) steps + 1 points per order, the logit decaying as ``exp(-rate * fraction)``
    with a per-image speed; empty lists for the others."""
    steps = config.faithfulness_steps
    sampled = np.array([bool(config.faithfulness_sample) and in_sample(config.faithfulness_seed, image_id,
                                                                      config.faithfulness_sample)
                        for image_id in image_ids], bool)
    m, points = int(sampled.sum()), steps + 1
    fractions = np.arange(points) / steps * config.faithfulness_fraction
    speed = rng.uniform(0.5, 1.5, m)
    orders, logits, probs = [], [], []
    for order, rate in CURVE_RATES.items():
        decay = np.exp(-rate * speed[:, None] * fractions[None, :])        # (m, points)
        orders.append(np.full((m, points), order, object))
        logits.append(logit[sampled, None] * decay)
        probs.append(prob[sampled, None] * decay)
    per_image = lambda parts: np.concatenate(parts, axis=1).ravel()  # noqa: E731 (orders in turn, per image)
    counts = np.where(sampled, len(CURVE_RATES) * points, 0)
    return _list_array(counts, {
        "order": pa.array(per_image(orders), pa.string()),
        "step": pa.array(np.tile(np.arange(points), m * len(CURVE_RATES)), pa.int16()),
        "fraction": pa.array(np.tile(fractions, m * len(CURVE_RATES)), pa.float32()),
        "logit": pa.array(per_image(logits), pa.float32()), "prob": pa.array(per_image(probs), pa.float32())},
        tables._CURVE_POINT)


_WORKER: dict = {}


def _init_worker(root: str, listing_path: str, wnids: list[str], seed: int, run_id: str) -> None:
    listing = pq.read_table(listing_path, columns=["image_id", "uri", "label", "shard"])
    lookup = {name: i for i, name in enumerate(wnids)}
    labels = listing.column("label").to_pylist()
    _WORKER.update(run=RunStore(root), listing=listing, wnids=wnids, seed=seed, run_id=run_id,
                   label_index=np.array([lookup[label] for label in labels], np.int32),
                   starts=np.searchsorted(listing.column("shard").to_numpy(), np.arange(
                       int(listing.column("shard")[-1].as_py()) + 2)),
                   preferences=_preferences(seed, len(wnids)))


def _write_shard(shard: int) -> tuple[int, float, float]:
    """Build and commit one shard; returns (shard, seconds building rows, seconds splitting + writing)."""
    w = _WORKER
    start, stop = int(w["starts"][shard]), int(w["starts"][shard + 1])
    began = time.perf_counter()
    result = shard_result(w["listing"].slice(start, stop - start), shard, w["label_index"][start:stop], w["wnids"],
                          w["preferences"], w["seed"])
    built = time.perf_counter()
    config = AnalysisConfig()
    shard_tables = tables.split_result(result, config.heatmap_size, config.deconv_size, config.deconv_mode,
                                       MODEL_ID, w["run_id"], config.composite)
    w["run"].commit(shard, shard_tables, result.num_rows)
    return shard, built - began, time.perf_counter() - built


def vgg16_layer_labels() -> dict[str, str]:
    """features.28 -> conv5_3, as ``run_audit`` writes into run.json; the model is built on the
    meta device, since only its layer structure is needed."""
    import torch

    from lrpscale.engine.models import build_vgg, layer_aliases

    with torch.device("meta"):
        model = build_vgg("vgg16", init=False)
    return {name: alias for alias, name in layer_aliases(model).items()}


def generate_run(root: str | Path, images: int = IMAGENET_TRAIN, classes: int = 1000, shard_size: int = 256,
                 seed: int = 0, processes: int = 2, progress: bool = False) -> dict:
    """Write a synthetic run of ``images`` images into ``root`` (which must not exist yet).

    Returns timings: seconds in all, and the summed seconds building rows and splitting + writing.
    """
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; choose a new directory for the synthetic run")
    started = time.time()
    listing, wnids = imagenet_listing(images, classes, seed)
    listing = listing.append_column("shard", pa.array(np.arange(listing.num_rows) // shard_size, pa.int32()))
    run = RunStore(root)
    run.write_listing(listing)
    config = RunConfig(input="/data/imagenet/train", output=str(root), model="vgg16", weights="imagenet",
                       input_kind="folder", image_size=224, shard_size=shard_size)
    key = fingerprint(config, MODEL_ID)
    run_id = run_id_for(key)
    shards = int(listing.column("shard")[-1].as_py()) + 1
    base = {"run_id": run_id, "fingerprint": key, "config": config.to_dict(), "model_id": MODEL_ID,
            "composite": config.analysis.composite, "layers": vgg16_layer_labels(), "versions": _versions(),
            "input": config.input,
            "images": listing.num_rows, "shards": shards, "created": started, "synthetic": {"seed": seed}}
    run.write_json({**base, "status": "running", "started": started})
    init = (str(root), run.path(LISTING), wnids, seed, run_id)
    build = write = 0.0
    if processes > 1:
        context = multiprocessing.get_context("fork")
        with context.Pool(processes, _init_worker, init) as pool:
            for done, (_, b, w) in enumerate(pool.imap_unordered(_write_shard, range(shards), chunksize=4), 1):
                build, write = build + b, write + w
                if progress and done % 200 == 0:
                    log.info("%d/%d shards, %.0f s", done, shards, time.time() - started)
    else:
        _init_worker(*init)
        for shard in range(shards):
            _, b, w = _write_shard(shard)
            build, write = build + b, write + w
    seconds = time.time() - started
    run.write_json({**base, "status": "complete", "started": started, "finished": time.time(),
                    "ok": listing.num_rows, "errors": 0, "seconds_last_start": seconds})
    return {"images": listing.num_rows, "shards": shards, "seconds": seconds, "build_seconds": build,
            "write_seconds": write, "commits": len(run.committed())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--images", type=int, default=IMAGENET_TRAIN)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    print(generate_run(args.output, args.images, args.classes, seed=args.seed, processes=args.processes,
                       progress=True))


if __name__ == "__main__":
    main()
