"""Small runs written through the real writer, without Ray or a model: analysis records shaped as
``BatchAnalysis.records()`` gives them, ``RESULT`` rows as the analyser actor builds them, and
shards split (``tables.split_result``) and committed (``RunStore.commit``) as ``run_audit`` does.

    store = write_run(tmp_path / "run", {0: result_table([image("a/1.png", "a", 0, record(0, [[1, 0], [0, 0]]))])})
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lrpscale.storage import tables
from lrpscale.storage.store import RunStore

HEATMAP_SIDE = 2  # heatmaps of hand-made records are 2x2
DECONV_SIDE = 1   # reconstructions are 3x1x1
DECONV_MODE = "all"
MODEL_ID = "hand:0"


def neuron(layer: str, index: int, relevance: float = 1.0, activation: float = 1.0, rank: int = 0) -> dict:
    return {"layer": layer, "neuron": index, "rank": rank, "relevance": relevance, "activation": activation}


def edge(lower: tuple[str, int], upper: tuple[str, int], relevance: float = 1.0) -> dict:
    return {"layer_from": lower[0], "neuron_from": lower[1], "layer_to": upper[0], "neuron_to": upper[1],
            "relevance": relevance}


def score(layer: str, k: int, smape: float, chosen: bool, variant: str = "fidelity", mse: float = 0.0) -> dict:
    return {"layer": layer, "k": k, "variant": variant, "mse": mse, "smape": smape, "chosen": chosen}


def deconvolution(layer: str, index: int, picture) -> dict:
    return {"layer": layer, "neuron": index, "reconstruction": np.asarray(picture, np.float32)}


def curve(order: str, logits, fraction: float = 0.5) -> list[dict]:
    """One order's region perturbation curve points (steps 0..L, fractions evenly to ``fraction``)."""
    steps = len(logits) - 1
    return [{"order": order, "step": k, "fraction": fraction * k / steps, "logit": value, "prob": 0.0}
            for k, value in enumerate(logits)]


def record(pred: int, heatmap, target: int | None = None, neurons=(), edges=(), scores=(), deconv=(),
           logit: float = 2.0, prob: float = 0.5, faithfulness=(), channel_relevance=None) -> dict:
    """One image's analysis record, with the keys and types of ``BatchAnalysis.records()``;
    ``channel_relevance`` (C,) is stored as given (None: the shard's images table has no such column)."""
    heatmap = np.asarray(heatmap, np.float32)
    return {"pred": pred, "target": pred if target is None else target, "logit": logit, "prob": prob,
            "rel_total": float(heatmap.sum()), "rel_pos": float(heatmap.clip(min=0).sum()),
            "rel_neg": float(heatmap.clip(max=0).sum()), "conservation_error": 0.0, "heatmap": heatmap,
            "channel_relevance": None if channel_relevance is None else np.asarray(channel_relevance, np.float32),
            "layer_totals": {"input": float(heatmap.sum())}, "neurons": list(neurons), "scores": list(scores),
            "edges": list(edges), "deconv": list(deconv), "faithfulness": list(faithfulness)}


def image(image_id: str, label: str | None, label_index: int | None, analysis: dict | None = None, shard: int = 0,
          error: tuple[str, str, str] | None = None) -> dict:
    """A ``RESULT`` row as the actor builds it: the input's fields, then its analysis (``result_row``
    of ``analysis``, the prediction named by its index) or its error (stage, type, message)."""
    row = {"image_id": image_id, "uri": f"/data/{image_id}", "label": label, "label_index": label_index,
           "shard": shard, "node_id": "node-1", "error_stage": None, "error_type": None, "error_message": None}
    if analysis is not None:
        row.update(tables.result_row(analysis, str(analysis["pred"])))
    if error is not None:
        row.update(zip(("error_stage", "error_type", "error_message"), error))
    return row


def result_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=tables.RESULT)


def split(result: pa.Table, run_id: str = "run-1", heatmap_side: int = HEATMAP_SIDE) -> dict[str, pa.Table]:
    return tables.split_result(result, heatmap_side, DECONV_SIDE, DECONV_MODE, MODEL_ID, run_id, "epsilon-gamma-box")


def write_run(location: str | Path | RunStore, shards: dict[int, pa.Table], info: dict | None = None,
              heatmap_side: int = HEATMAP_SIDE) -> RunStore:
    """A run of hand-made shards: run.json (a complete run of these shards, updated by ``info``),
    then each shard committed."""
    store = location if isinstance(location, RunStore) else RunStore(location)
    info = {"run_id": "run-1", "model_id": MODEL_ID, "config": {"model": "vgg16"}, "status": "complete",
            "shards": len(shards), **(info or {})}
    store.write_json(info)
    for shard, result in shards.items():
        store.commit(shard, split(result, info["run_id"], heatmap_side), result.num_rows)
    return store


def synthetic_listing(images: int, classes: int, shard_size: int) -> tuple[pa.Table, list[str]]:
    """An ImageNet-style listing cut into shards, and its class names (wnids)."""
    from lrpscale.run.synthetic import imagenet_listing

    listing, wnids = imagenet_listing(images, classes, seed=0)
    return listing.append_column("shard", pa.array(np.arange(listing.num_rows) // shard_size, pa.int32())), wnids


def write_synthetic_run(location: str | Path, listing: pa.Table, wnids: list[str], seed: int) -> RunStore:
    """A synthetic run (``synthetic.shard_result``) of the given listing: runs of one listing with
    different seeds hold the same images, classes and shards with different predictions, heatmaps
    and neurons, as two models audited on one dataset would."""
    from lrpscale.config import AnalysisConfig
    from lrpscale.run.synthetic import PATH_LAYERS, shard_result

    config = AnalysisConfig()
    run_id = f"synthetic-{seed}"
    store = RunStore(location)
    shard_of = listing.column("shard").to_numpy()
    store.write_json({"run_id": run_id, "model_id": f"synthetic:{seed}", "config": {"model": "vgg16"},
                      "status": "complete", "shards": len(np.unique(shard_of))})
    row_of = {name: i for i, name in enumerate(wnids)}
    label_index = np.array([row_of[label] for label in listing.column("label").to_pylist()], np.int32)
    preferences = [np.zeros((len(wnids), width), np.float32) for _, width in PATH_LAYERS]  # no class prefers a neuron
    for shard in np.unique(shard_of).tolist():
        rows = np.flatnonzero(shard_of == shard)
        result = shard_result(listing.take(rows), shard, label_index[rows], wnids, preferences, seed, config)
        store.commit(shard, tables.split_result(result, config.heatmap_size, config.deconv_size, config.deconv_mode,
                                                f"synthetic:{seed}", run_id, config.composite), result.num_rows)
    return store
