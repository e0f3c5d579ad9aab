"""Evaluating a run's explanations: faithfulness (region perturbation) and model randomisation
checks of LRP composites against gradient baselines, on a seeded sample of the run's images.

    evaluation = evaluate_run("lrpscale-demo/run", sample=64)
    evaluation.summary()          # one row per method
    evaluation.most_faithful      # the LRP composite with the largest MoRF - random AOPC

In-process (no Ray): the run's model is loaded here, the sampled listing rows are decoded with
the run's image size and the model's normalisation, and every method explains every sampled image
for the run's stored target (the ``target`` column of its images table). Then:

- ``region_perturbation`` (``lrpscale.engine.faithfulness``) in all three orders (MoRF, LeRF,
  random) on all sampled images, batched. The random order of an image is seeded by ``seed`` and
  its image_id, so it is the same for every method and every sample that holds the image.
- ``cascade`` on ``cascade_sample`` images and ``efficient_mprt`` on ``mprt_sample`` images
  (``lrpscale.engine.randomisation``), seeded by ``seed``.

The three samples are prefixes of one seeded permutation of the run's analysed images, so the
smaller ones lie inside the larger and one decode serves all.

Cost, in heatmaps of the run's model (benchmarks/README.md, "faithfulness.py"): per method,
region perturbation costs about 11.7 heatmaps per sampled image at the defaults (10 steps to half
the patches, 3 orders: 31 forwards per image), plus the heatmap itself; the cascade costs
(layers + 1) heatmaps per image (17 for a VGG16) and eMPRT 2. At the defaults (6 methods, 64
images, 64 cascade and 256 eMPRT images) that is about 6 x (64 x 12.7 + 64 x 17 + 256 x 2) =
14,500 heatmaps (gradient heatmaps are cheaper than LRP ones, so somewhat less): about 4 h of a
2-core CPU at 224 px with a VGG16 (~1 s per heatmap) and minutes on a GPU. On a CPU, pass
smaller samples (``--cascade-sample 8 --mprt-sample 16``).

Written through the run store to ``RUN/evaluation/<settings id>/`` (the id is a short sha256 of
the settings, so other settings never mix with these rows and the same settings replace them):

- ``faithfulness.parquet``: image_id, method, order, step, fraction, logit, prob; one row per
  image x method x order x step (steps + 1 steps, step 0 the unperturbed image).
- ``aopc.parquet``: image_id, label, method, order, aopc; AOPC on the target logit,
  ``mean_{k=1..steps} (logit_0 - logit_k)``.
- ``randomisation.parquet``: image_id, method, check ("cascade" or "emprt"), step, layer, value.
  cascade: step k = k layers randomised from the top, layer = the one randomised at step k (its
  VGG alias where the run recorded one), value = Spearman of |heatmap| with the original's.
  emprt: step = every conv/linear layer randomised (their count), layer null, value = entropy
  ratio (above 1: the heatmap turns to noise under random weights).
- ``settings.json`` (settings, versions, time), ``summary.json`` (``Evaluation.summary()``,
  ``most_faithful``, counts, seconds).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lrpscale import __version__
from lrpscale.config import COMPOSITE_NAMES
from lrpscale.engine import devices, randomisation
from lrpscale.engine.faithfulness import ORDERS, region_perturbation
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.inputs import decoding
from lrpscale.inputs.preprocess import normalise
from lrpscale.locations import fetched
from lrpscale.results.run import EVALUATION_SETTINGS, EVALUATION_SUMMARY, EVALUATION_TABLES, Run
from lrpscale.run.sampling import image_seed
from lrpscale.storage.store import EVALUATION, RunStore

log = logging.getLogger(__name__)

BASELINES = ("gradient", "gradient_x_input")  # always evaluated: the bar an LRP composite has to clear
METHODS = (*COMPOSITE_NAMES, *BASELINES)
HEATMAP_BATCH = 16  # images per explain call: bounds the activations an LRP pass keeps (224 px VGG16: ~1.5 GB)


@dataclass
class Evaluation:
    """One evaluation of a run (tables in the module docstring), as pandas DataFrames.

    faithfulness: (images x methods x orders x (steps+1)) rows. aopc: (images x methods x orders)
    rows. randomisation: (cascade images x methods x layers + eMPRT images x methods) rows.
    settings: every setting (``methods`` in evaluation order). location: the folder written.
    """

    faithfulness: pd.DataFrame
    aopc: pd.DataFrame
    randomisation: pd.DataFrame
    settings: dict
    settings_id: str
    location: str
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per method (index ``method``, evaluation order): ``aopc_morf``, ``aopc_lerf``,
        ``aopc_random`` (mean AOPC over the sampled images), ``morf_minus_random`` (their mean
        per-image difference), ``cascade_final_abs_spearman`` (mean |Spearman| after the last
        cascade step: near 0 is good) and ``emprt_ratio`` (mean eMPRT entropy ratio: above 1 is
        good); NaN where a check had no images."""
        methods = list(self.settings["methods"])
        aopc = self.aopc.pivot_table(index="method", columns="order", values="aopc", aggfunc="mean")
        table = pd.DataFrame(index=pd.Index(methods, name="method"))
        for order in ORDERS:
            table[f"aopc_{order}"] = aopc[order] if order in aopc else np.nan
        table["morf_minus_random"] = table["aopc_morf"] - table["aopc_random"]  # mean of differences = difference of means
        checks = self.randomisation
        cascade = checks[checks["check"] == "cascade"]
        final = cascade[cascade["step"] == cascade.groupby("method")["step"].transform("max")]
        table["cascade_final_abs_spearman"] = final["value"].abs().groupby(final["method"]).mean()
        emprt = checks[checks["check"] == "emprt"]
        table["emprt_ratio"] = emprt.groupby("method")["value"].mean()
        return table

    @property
    def most_faithful(self) -> str | None:
        """The LRP composite with the largest mean ``morf_minus_random`` (None when no composite
        was evaluated or none has a finite value)."""
        gaps = self.summary()["morf_minus_random"]
        gaps = gaps[gaps.index.isin(COMPOSITE_NAMES)].dropna()
        return None if gaps.empty else str(gaps.idxmax())


def settings_id_of(settings: dict) -> str:
    """A short (12 hex digits) sha256 of the settings, as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def evaluate_run(run: str | os.PathLike | RunStore | Run, methods: Sequence[str] | None = None, sample: int = 64,
                 seed: int = 0, steps: int = 10, fraction: float = 0.5, patch_size: int | None = None,
                 cascade_sample: int = 64, mprt_sample: int = 256, device: str = "auto") -> Evaluation:
    """Evaluate a run's explanations (module docstring) and write the tables into the run.

    run: a run location (or its ``RunStore``/``Run``). methods: LRP composite names (default all
    of ``COMPOSITE_NAMES``); "gradient" and "gradient_x_input" are always added. sample: images
    of the faithfulness check (all when the run has fewer), the first of ``draw_sample``'s seeded
    permutation, so the same seed on the same run draws the same images. steps, fraction,
    patch_size: region perturbation's (default patch side ``max(1, S // 28)``). cascade_sample,
    mprt_sample: images of the cascade and of eMPRT, the first of the same permutation (0: skip).
    device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    """
    started = time.time()
    store = run.store if isinstance(run, Run) else run if isinstance(run, RunStore) else RunStore(run)
    info = store.read_json()
    if info is None or not store.has_listing():
        raise ValueError(f"{store.location} is not an lrpscale run (no run.json or listing); "
                         "pass the directory given to `lrpscale run --output`")
    for name, value in (("sample", sample), ("steps", steps)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name, value in (("cascade_sample", cascade_sample), ("mprt_sample", mprt_sample)):
        if int(value) < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    chosen_methods = _methods(methods)
    target_device = devices.torch_device(device)
    settings = {"methods": list(chosen_methods), "sample": int(sample), "seed": int(seed), "steps": int(steps),
                "fraction": float(fraction), "patch_size": None if patch_size is None else int(patch_size),
                "cascade_sample": int(cascade_sample), "mprt_sample": int(mprt_sample)}
    settings_id = settings_id_of(settings)

    config = info.get("config") or {}
    model = load_model(config.get("model", "vgg16"), fetched(config.get("weights")))
    mean, std = input_normalization(model)
    image_size = int(config.get("image_size") or model.lrpscale_image_size)
    images = draw_sample(Run(store), max(sample, cascade_sample, mprt_sample), seed)
    x, images = _decode(store, images, image_size, mean, std)
    perturbed = min(sample, len(images))  # the faithfulness sample: the first of the permutation
    model = model.to(target_device)
    x = x.to(target_device)
    target = torch.as_tensor(images["target"].to_numpy(np.int64), device=target_device)
    log.info("evaluating %s: %d images, methods %s, on %s (settings %s)", store.location, len(images),
             ", ".join(chosen_methods), target_device, settings_id)

    curves, checks = {}, []
    seeds = torch.tensor([image_seed(seed, image_id) for image_id in images["image_id"][:perturbed]], dtype=torch.int64)
    aliases = info.get("layers") or {}
    randomised = randomisation.randomised_copy(model, seed=seed) if mprt_sample else None
    for method in chosen_methods:
        explain = _batched(_explain_fn(method))
        tick = time.time()
        heatmaps = explain(model, x[:perturbed], target[:perturbed])
        curves[method] = region_perturbation(model, x[:perturbed], heatmaps, target[:perturbed], patch_size=patch_size,
                                             steps=steps, fraction=fraction, seed=seeds)
        log.info("%s: region perturbation of %d images in %.1f s", method, perturbed, time.time() - tick)
        if cascade_sample:
            tick = time.time()
            count = min(cascade_sample, len(x))
            for step, (layer, values) in enumerate(randomisation.cascade(model, x[:count], target[:count], explain,
                                                                         seed=seed), start=1):
                checks.append(_check_rows(images["image_id"][:count], method, "cascade", step,
                                          aliases.get(layer, layer), values))
            log.info("%s: cascade of %d images in %.1f s", method, count, time.time() - tick)
        if mprt_sample:
            tick = time.time()
            count = min(mprt_sample, len(x))
            values = randomisation.efficient_mprt(model, x[:count], target[:count], explain, seed=seed,
                                                  randomised=randomised)
            checks.append(_check_rows(images["image_id"][:count], method, "emprt",
                                      len(randomisation.parameter_layers(model)), None, values))
            log.info("%s: eMPRT of %d images in %.1f s", method, count, time.time() - tick)

    faithfulness, aopc = _faithfulness_tables(images.iloc[:perturbed], curves)
    checks_table = pd.concat(checks, ignore_index=True) if checks else _check_rows([], "", "", 0, None, torch.zeros(0))
    evaluation = Evaluation(faithfulness, aopc, checks_table, settings, settings_id,
                            store.path(EVALUATION, settings_id), time.time() - started, _versions())
    _write(store, evaluation)
    log.info("evaluation %s written to %s in %.1f s; most faithful composite: %s", settings_id, evaluation.location,
             evaluation.seconds, evaluation.most_faithful)
    return evaluation


def draw_sample(run: Run, sample: int, seed: int) -> pd.DataFrame:
    """The sampled rows of the run's images table (image_id, label, target), in draw order: the
    first ``min(sample, images)`` of ``default_rng(seed).permutation`` of the sorted analysed
    image_ids, so a smaller sample is the start of a larger one."""
    images = run.table("images", columns=["image_id", "label", "target"])
    if images.empty:
        raise ValueError(f"{run.store.location} has no analysed images (no committed shard); "
                         "finish the run with `lrpscale run` first")
    ids = np.sort(images["image_id"].to_numpy(dtype=object))
    chosen = np.random.default_rng(seed).permutation(ids)[:int(sample)]
    return images.set_index("image_id").loc[list(chosen)].reset_index()


def _methods(methods: Sequence[str] | None) -> tuple[str, ...]:
    """The methods in a fixed order (the composites as given, then the baselines), so the same set
    gives the same settings id; unknown names refused."""
    if isinstance(methods, str):
        methods = [methods]  # one name, not its characters
    requested = list(COMPOSITE_NAMES if methods is None else methods)
    unknown = [name for name in requested if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    composites = [name for name in COMPOSITE_NAMES if name in requested]
    return (*composites, *BASELINES)


def _explain_fn(method: str) -> randomisation.ExplainFn:
    if method == "gradient":
        return randomisation.gradient
    if method == "gradient_x_input":
        return randomisation.gradient_x_input
    return functools.partial(randomisation.lrp, composite=method)


def _batched(explain: randomisation.ExplainFn) -> randomisation.ExplainFn:
    """explain_fn over ``HEATMAP_BATCH`` images at a time: (N, C, H, W) in, (N, C, H, W) out."""

    def run(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = torch.as_tensor(target, device=x.device).long().reshape(-1).expand(len(x))
        return torch.cat([explain(model, x[i:i + HEATMAP_BATCH], target[i:i + HEATMAP_BATCH])
                          for i in range(0, len(x), HEATMAP_BATCH)])

    return run


def _decode(store: RunStore, images: pd.DataFrame, image_size: int, mean, std) -> tuple[torch.Tensor, pd.DataFrame]:
    """(N, 3, S, S) float32 pixels of the sampled images, read from the run's listing, and the
    sample without those that no longer decode (logged: their file changed since the run)."""
    listing = store.read_listing()
    rows = listing.filter(pc.is_in(listing.column("image_id"), value_set=pa.array(images["image_id"], pa.string())))
    batch = decoding.decode_rows(rows, image_size)
    position = {image_id: i for i, image_id in enumerate(batch["image_id"])}
    missing = [image_id for image_id in images["image_id"] if image_id not in position]
    failed = [image_id for image_id in images["image_id"] if image_id in position and not batch["ok"][position[image_id]]]
    if missing or failed:
        log.warning("%d sampled images are not in the listing and %d no longer decode (e.g. %s); evaluating the others",
                    len(missing), len(failed), (missing + failed)[0])
    images = images[[image_id in position and bool(batch["ok"][position[image_id]]) for image_id in images["image_id"]]]
    if images.empty:
        raise ValueError(f"none of the sampled images of {store.location} could be read again; "
                         "check that the run's input is still where it was analysed")
    pixels = normalise(np.stack([batch["pixels"][position[image_id]] for image_id in images["image_id"]]), mean, std)
    return torch.from_numpy(pixels), images.reset_index(drop=True)


def _check_rows(image_ids, method: str, check: str, step: int, layer: str | None, values: torch.Tensor) -> pd.DataFrame:
    values = values.detach().double().cpu().numpy()
    return pd.DataFrame({"image_id": pd.Series(list(image_ids), dtype=object), "method": method, "check": check,
                         "step": np.full(len(values), step, np.int32), "layer": pd.Series([layer] * len(values), dtype=object),
                         "value": values})


def _faithfulness_tables(images: pd.DataFrame, curves: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faithfulness, aopc) DataFrames from ``{method: PerturbationCurves}``: the curve rows in
    image, method, order, step order, and one AOPC row per image, method and order."""
    ids = images["image_id"].to_numpy(dtype=object)
    labels = images["label"].to_numpy(dtype=object)
    parts, aopc_parts = [], []
    for method, result in curves.items():
        n, points = result.logits[ORDERS[0]].shape
        fractions = result.fractions.cpu().numpy()
        for order in ORDERS:
            parts.append(pd.DataFrame({
                "image_id": np.repeat(ids, points), "method": method, "order": order,
                "step": np.tile(np.arange(points, dtype=np.int32), n), "fraction": np.tile(fractions, n),
                "logit": result.logits[order].double().cpu().numpy().reshape(-1),
                "prob": result.probs[order].double().cpu().numpy().reshape(-1)}))
            aopc_parts.append(pd.DataFrame({"image_id": ids, "label": labels, "method": method, "order": order,
                                            "aopc": result.aopc[order].double().cpu().numpy()}))
    faithfulness = pd.concat(parts, ignore_index=True)
    # one image's rows together, methods and orders in evaluation order (the concatenation's order within)
    image_rank = {image_id: i for i, image_id in enumerate(ids)}
    faithfulness = faithfulness.sort_values("image_id", key=lambda c: c.map(image_rank), kind="stable", ignore_index=True)
    aopc = pd.concat(aopc_parts, ignore_index=True)
    aopc = aopc.sort_values("image_id", key=lambda c: c.map(image_rank), kind="stable", ignore_index=True)
    return faithfulness, aopc


def _write(store: RunStore, evaluation: Evaluation) -> None:
    """The tables, then settings.json (which makes the evaluation listed by ``Run.evaluations``),
    then summary.json; each file atomically, so the same settings replace the old files whole."""
    folder = f"{EVALUATION}/{evaluation.settings_id}"
    frames = {"faithfulness": evaluation.faithfulness, "aopc": evaluation.aopc, "randomisation": evaluation.randomisation}
    for name in EVALUATION_TABLES:
        store.write_parquet(f"{folder}/{name}.parquet", pa.Table.from_pandas(frames[name], preserve_index=False),
                            compression="zstd")
    written = {"settings_id": evaluation.settings_id, "settings": evaluation.settings, "versions": evaluation.versions,
               "run_id": (store.read_json() or {}).get("run_id"), "time": time.time()}
    store.write_bytes(f"{folder}/{EVALUATION_SETTINGS}", json.dumps(written, indent=2).encode())
    summary = evaluation.summary()
    content = {"settings_id": evaluation.settings_id, "most_faithful": evaluation.most_faithful,
               "images": int(evaluation.aopc["image_id"].nunique()), "seconds": evaluation.seconds,
               "methods": _json_safe(summary.reset_index().to_dict("records"))}
    store.write_bytes(f"{folder}/{EVALUATION_SUMMARY}", json.dumps(content, indent=2).encode())


def _json_safe(rows: list[dict]) -> list[dict]:
    """NaN and inf (a check without images, an eMPRT of a constant heatmap) as null: strict JSON."""
    return [{key: (None if isinstance(value, float) and not np.isfinite(value) else value) for key, value in row.items()}
            for row in rows]


def _versions() -> dict:
    return {"lrpscale": __version__, "torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}

