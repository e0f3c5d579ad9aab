"""Reference images per neuron (docs/method.md §18, "Reference images"): relevance maximisation as
zennit-crp does it. Which neurons need references, which images show each one best (the highest
normalised relevance of that neuron, over the whole run and within a class), and the crop rule;
``lrpscale.run.references`` computes the channel-conditional heatmaps on the actors and writes
``classes/references.parquet``.

    neurons = reference_neurons(store)                 # (layer, neuron, grouping, class) to show
    chosen = choose_references(store, neurons)         # up to 8 images per neuron and scope
    box = crop_box(heatmap)                            # (top, left, bottom, right), half-open
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from lrpscale.results.class_counts import BY, class_order
from lrpscale.results.run import STRATEGY_FILES
from lrpscale.storage.store import CLASSES, RunStore

REFERENCES = "references.parquet"
REFERENCE_SETTINGS = "references.json"  # written last: the table is complete once it exists
SCOPES = ("run", "class")
# how an image's score for a neuron was measured: the stored channel relevance (r_c / sum |r|, every
# image; the first swept layer), or the neurons table's relevance over the target logit (r_c / |z_t|,
# the images that selected the neuron; every other path layer, which stores no channel relevance)
MEASURES = ("channel_relevance", "selected_relevance")

# zennit-crp smooths with torchvision's gaussian_blur, kernel_size 19 (sigma 3.2, radius 9) at 224 px
CRP_SIGMA, CRP_RADIUS, CRP_SIDE = 3.2, 9, 224

# a reference's crop: the box (half-open, in model-input pixels), the input's crop as the model saw it
# (PNG, RGB) and the conditional heatmap over it (float16 / max |.|, row-major, times ``scale`` in
# relevance units), both ``height`` x ``width`` (at most ``crop_pixels`` on the longer side);
# ``crop_pictures`` turns one into numpy arrays
CROP = pa.struct([("top", pa.int32()), ("left", pa.int32()), ("bottom", pa.int32()), ("right", pa.int32()),
                  ("height", pa.int32()), ("width", pa.int32()), ("image", pa.binary()),
                  ("heatmap", pa.list_(pa.float16())), ("scale", pa.float32())])
REFERENCE_ROWS = pa.schema([("layer", pa.string()), ("neuron", pa.int32()), ("scope", pa.string()),
                            ("grouping", pa.string()), ("class", pa.string()), ("rank", pa.int16()),
                            ("image_id", pa.string()), ("score", pa.float32()), ("measure", pa.string()),
                            ("crop", CROP)])
_KEYS = ["layer", "neuron", "scope", "grouping", "class"]


@dataclass(frozen=True)
class ReferenceSettings:
    """How references are made; recorded in ``references.json``. images: per neuron and scope;
    class_neurons: each class's most frequently selected neurons at the swept layer that get
    references besides the distinguishing ones; threshold: the crop keeps the pixels whose smoothed
    relevance exceeds this share of its maximum; crop_pixels: the longer side of a stored crop."""

    images: int = 8
    class_neurons: int = 4
    threshold: float = 0.1
    crop_pixels: int = 64

    def __post_init__(self):
        for name in ("images", "crop_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.class_neurons < 0:
            raise ValueError(f"class_neurons must be at least 0, got {self.class_neurons}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


# --- which neurons ---------------------------------------------------------------------------------

def channel_layer(info: dict) -> str | None:
    """The module name of the layer whose relevance per channel the images table stores (the first
    swept layer: the configured one, by name or alias, or the last conv), from run.json; None when
    run.json records no layers."""
    layers = info.get("layers") or {}
    swept = ((info.get("config") or {}).get("analysis") or {}).get("sweep_layers")
    if swept:
        by_alias = {alias: name for name, alias in layers.items()}
        return by_alias.get(swept[0], swept[0])
    convs = [name for name, alias in layers.items() if alias.startswith("conv") and name.startswith("features.")]
    return max(convs, key=lambda name: int(name.split(".")[1])) if convs else None


def reference_neurons(run: RunStore, class_neurons: int = 4, layer: str | None = None) -> pd.DataFrame:
    """The neurons that get references, one row per (layer, neuron, grouping, class) they stand for:
    every distinguishing neuron of every cluster (``strategy_clusters``) in its class, and each
    class's ``class_neurons`` most frequently selected neurons at ``layer`` (default the swept layer,
    ``channel_layer``) from the reducer's ``nodes`` table (ties: higher mean relevance, then lower
    index, as in the class graphs), left out when the run is not reduced. Sorted and unique."""
    frames = []
    if run.is_file(CLASSES, STRATEGY_FILES["strategy_clusters"]):
        clusters = run.read_parquet(f"{CLASSES}/{STRATEGY_FILES['strategy_clusters']}",
                                    columns=["grouping", "class", "distinguishing_neurons"]).to_pandas()
        frames.append(pd.DataFrame([(n["layer"], int(n["neuron"]), grouping, cls)
                                    for grouping, cls, neurons in zip(clusters["grouping"], clusters["class"],
                                                                      clusters["distinguishing_neurons"])
                                    for n in neurons], columns=["layer", "neuron", "grouping", "class"]))
    layer = layer or channel_layer(run.read_json() or {})
    if class_neurons and layer and run.is_file(CLASSES, "nodes.parquet"):
        nodes = run.read_parquet(f"{CLASSES}/nodes.parquet",
                                 columns=["by", "class", "layer", "neuron", "frequency", "mean_relevance"],
                                 filters=[("layer", "==", layer)]).to_pandas()
        nodes = nodes.sort_values(["by", "class", "frequency", "mean_relevance", "neuron"],
                                  ascending=[True, True, False, False, True], kind="stable")
        top = nodes.groupby(["by", "class"], sort=False).head(class_neurons)
        frames.append(pd.DataFrame({"layer": top["layer"], "neuron": top["neuron"].astype(np.int64),
                                    "grouping": top["by"], "class": top["class"].astype(str)}))
    if not frames:
        return pd.DataFrame({"layer": pd.Series(dtype=str), "neuron": pd.Series(dtype=np.int64),
                             "grouping": pd.Series(dtype=str), "class": pd.Series(dtype=str)})
    neurons = pd.concat(frames, ignore_index=True).astype({"neuron": np.int64})
    return neurons.drop_duplicates().sort_values(["layer", "neuron", "grouping", "class"], ignore_index=True)


# --- which images ----------------------------------------------------------------------------------

def choose_references(run: RunStore, neurons: pd.DataFrame, count: int = 8, layer: str | None = None) -> pd.DataFrame:
    """Per neuron of ``neurons`` (``reference_neurons``) the ``count`` images with its highest
    positive score, in two scopes: "run" (every analysed image; grouping and class None) and
    "class" (the images of that class in that grouping, by label or by prediction). Ties go to the
    lower image_id. The score at ``layer`` (default the swept layer, whose channel relevance the
    images table stores in every file) is the stored ``channel_relevance`` of the neuron, r_c /
    sum_c |r_c| (measure "channel_relevance"); at any other layer, or where the images table lacks
    that column, it is the neurons table's relevance over the image's |target logit|, among the images
    that selected the neuron (measure "selected_relevance"). An image with no positive score is
    never a reference. Reads the committed files one shard at a time with column projection (and a
    filter on the layers in the neurons table).

    Returns layer, neuron, scope, grouping, class, rank (0 = highest), image_id, score, measure."""
    layer = layer or channel_layer(run.read_json() or {})
    if neurons.empty:
        return _chosen_frame(pd.DataFrame(columns=[*_KEYS, "image_id", "score"]), layer)
    images_files = run.committed_files("images")
    stored = bool(images_files) and all("channel_relevance" in run.parquet_file(path).schema_arrow.names
                                        for path in images_files)
    channel = layer if stored and layer in set(neurons["layer"]) else None
    wanted = neurons.astype({"neuron": np.int64})
    neuron_files = {path.rpartition("/")[2]: path for path in run.committed_files("neurons")}
    other_layers = sorted(set(wanted["layer"]) - {channel})
    best = pd.DataFrame(columns=[*_KEYS, "image_id", "score"])
    for path in images_files:
        columns = ["image_id", "label", "pred", "logit"] + (["channel_relevance"] if channel else [])
        with run.parquet_file(path) as parquet:
            images = parquet.read(columns=columns)
        parts = [best]
        if channel:
            parts += _channel_candidates(images, wanted[wanted["layer"] == channel], channel, count)
        name = path.rpartition("/")[2]
        if other_layers and name in neuron_files:
            rows = ds.dataset(neuron_files[name], format="parquet", filesystem=run.fs).to_table(
                columns=["image_id", "layer", "neuron", "relevance"],
                filter=ds.field("layer").isin(other_layers))
            parts += _selected_candidates(images, rows, wanted[wanted["layer"].isin(other_layers)])
        best = _top(pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts)
                    else best, count)
    return _chosen_frame(best, channel)


def _channel_candidates(images: pa.Table, wanted: pd.DataFrame, layer: str, count: int) -> list[pd.DataFrame]:
    """Scores from the stored channel relevance of one file's images: for the run scope each
    neuron's ``count`` best rows of the file (ties kept, so the merge stays exact), for the class
    scope every row of a class against that class's neurons."""
    relevance = images.column("channel_relevance")
    present = relevance.is_valid()
    if isinstance(present, pa.ChunkedArray):
        present = present.combine_chunks()
    images = images.filter(present)
    if images.num_rows == 0 or wanted.empty:
        return []
    values = images.column("channel_relevance").combine_chunks().to_numpy_ndarray().astype(np.float32)
    ids = np.asarray(images.column("image_id").to_pylist(), dtype=object)
    out = []
    channels = np.unique(wanted["neuron"].to_numpy(np.int64))
    scores = values[:, channels]
    keep = scores > 0
    if len(scores) > count:  # the count-th largest of each column: rows below it cannot make the top
        keep &= scores >= np.partition(scores, len(scores) - count, axis=0)[len(scores) - count]
    rows, columns = np.nonzero(keep)
    out.append(pd.DataFrame({"layer": layer, "neuron": channels[columns], "scope": "run", "grouping": "",
                             "class": "", "image_id": ids[rows], "score": scores[rows, columns]}))
    for grouping in BY:
        mine = wanted[wanted["grouping"] == grouping][["class", "neuron"]]
        if mine.empty:
            continue
        classes = _class_strings(images.column(grouping))
        rows_of = pd.DataFrame({"row": np.arange(len(ids)), "class": classes}).dropna()
        pairs = rows_of.merge(mine, on="class")
        row, neuron = pairs["row"].to_numpy(np.int64), pairs["neuron"].to_numpy(np.int64)
        found = pd.DataFrame({"layer": layer, "neuron": neuron, "scope": "class", "grouping": grouping,
                              "class": pairs["class"].to_numpy(object), "image_id": ids[row],
                              "score": values[row, neuron]})
        out.append(found[found["score"] > 0])
    return out


def _selected_candidates(images: pa.Table, rows: pa.Table, wanted: pd.DataFrame) -> list[pd.DataFrame]:
    """Scores from one shard's neurons rows: relevance / |target logit| of each selected neuron."""
    if rows.num_rows == 0 or wanted.empty:
        return []
    info = pd.DataFrame({"image_id": images.column("image_id").to_pylist(),
                         "label": _class_strings(images.column("label")),
                         "pred": _class_strings(images.column("pred")),
                         "logit": images.column("logit").to_numpy(zero_copy_only=False).astype(np.float64)})
    selected = rows.to_pandas().astype({"neuron": np.int64}).drop_duplicates(["image_id", "layer", "neuron"])
    selected = selected.merge(info, on="image_id")
    selected["score"] = (selected["relevance"].to_numpy(np.float64)
                         / np.maximum(np.abs(selected["logit"].to_numpy()), np.finfo(np.float32).tiny)).astype(np.float32)
    selected = selected[selected["score"] > 0]
    out = [selected.merge(wanted[["layer", "neuron"]].drop_duplicates(), on=["layer", "neuron"])
           .assign(scope="run", grouping="", **{"class": ""})]
    for grouping in BY:
        mine = wanted[wanted["grouping"] == grouping][["layer", "neuron", "class"]]
        found = selected.dropna(subset=[grouping]).merge(mine, left_on=["layer", "neuron", grouping],
                                                         right_on=["layer", "neuron", "class"])
        out.append(found.assign(scope="class", grouping=grouping))
    return [frame[[*_KEYS, "image_id", "score"]] for frame in out if len(frame)]


def _class_strings(column) -> np.ndarray:
    """A label or pred column as class names (strings; None where missing), as strategies name them."""
    values = column.to_pylist()
    return np.array([None if v is None else str(v) for v in values], dtype=object)


def _top(candidates: pd.DataFrame, count: int) -> pd.DataFrame:
    """Per key the ``count`` rows of highest score, ties by image_id; a total order, so the top of
    the union of parts is the top of the parts' tops."""
    ordered = candidates.sort_values([*_KEYS, "score", "image_id"], ascending=[True] * 5 + [False, True],
                                     kind="stable")
    return ordered.groupby(_KEYS, sort=False).head(count).reset_index(drop=True)


def _chosen_frame(best: pd.DataFrame, channel: str | None) -> pd.DataFrame:
    """The merged candidates as the chosen rows: run scope first, then class by grouping and class
    order; rank within each key; grouping and class None in the run scope."""
    best = best.copy()
    best["scope_order"] = best["scope"].map(SCOPES.index) if len(best) else []
    best["class_order"] = [class_order(str(c)) for c in best["class"]]
    best = best.sort_values(["layer", "neuron", "scope_order", "grouping", "class_order", "score", "image_id"],
                            ascending=[True, True, True, True, True, False, True], kind="stable")
    best["rank"] = best.groupby(_KEYS, sort=False).cumcount()
    best["measure"] = np.where(best["layer"] == channel, MEASURES[0], MEASURES[1]) if len(best) else []
    for name in ("grouping", "class"):
        best[name] = best[name].where(best["scope"] == "class", None)
    frame = best[["layer", "neuron", "scope", "grouping", "class", "rank", "image_id", "score", "measure"]]
    return frame.astype({"neuron": np.int64, "rank": np.int64, "score": np.float32}).reset_index(drop=True)


# --- the crop rule ---------------------------------------------------------------------------------

def smoothing(side: int) -> tuple[float, int]:
    """(sigma, radius) in pixels of the Gaussian that smooths a side x side heatmap: zennit-crp's
    kernel (sigma 3.2, radius 9 at 224 px) scaled to the image, radius at least 1 and below ``side``."""
    if side < 2:
        return 0.0, 0
    scale = side / CRP_SIDE
    return CRP_SIGMA * scale, max(1, min(side - 1, round(CRP_RADIUS * scale)))


def smooth(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) float64: a separable Gaussian of ``smoothing(max(H, W))``, weights normalised
    to sum 1 over the kernel, the borders mirrored without repeating the edge pixel (torch's
    "reflect", as torchvision's gaussian_blur pads)."""
    values = np.asarray(heatmap, np.float64)
    sigma, radius = smoothing(max(values.shape))
    if radius == 0:
        return values.copy()
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    for axis in (0, 1):
        reach = min(radius, values.shape[axis] - 1)
        if reach == 0:
            continue
        kernel = weights[radius - reach:radius + reach + 1] / weights[radius - reach:radius + reach + 1].sum()
        padded = np.pad(values, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        values = sum(kernel[k] * np.take(padded, np.arange(k, k + values.shape[axis]), axis=axis)
                     for k in range(len(kernel)))
    return values


def crop_box(heatmap: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int, int]:
    """The crop of a conditional heatmap (docs/method.md §18, "Reference images"): (top, left,
    bottom, right), half-open, in the heatmap's pixels. ``heatmap``: (H, W), or (3, H, W) summed
    over colour first. With G = ``smooth`` of it and m = max G: the bounding box of the pixels with
    G > threshold * m; the whole picture when m <= 0 (no positive relevance) or m is not finite."""
    values = np.asarray(heatmap, np.float64)
    if values.ndim == 3:
        values = values.sum(0)
    height, width = values.shape
    smoothed = smooth(values)
    peak = float(smoothed.max()) if smoothed.size else 0.0
    if not (math.isfinite(peak) and peak > 0):
        return 0, 0, height, width
    rows, columns = np.nonzero(smoothed > threshold * peak)
    return int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1


def reference_crop(pixels: np.ndarray, heatmap: np.ndarray, threshold: float = 0.1, crop_pixels: int = 64) -> dict:
    """One ``CROP`` value: the crop box of ``heatmap`` (S, S) (or (3, S, S)) applied to the input
    picture ``pixels`` (3, S, S) uint8 as the model saw it and to the heatmap, both area-resized
    so the longer side is at most ``crop_pixels``. image: PNG (RGB); heatmap: float16, row-major
    (height, width), divided by its largest |value| (kept as scale), as stored pictures are."""
    from PIL import Image

    values = np.asarray(heatmap, np.float32)
    if values.ndim == 3:
        values = values.sum(0)
    top, left, bottom, right = crop_box(values, threshold)
    picture = np.ascontiguousarray(np.asarray(pixels, np.uint8)[:, top:bottom, left:right].transpose(1, 2, 0))
    part = np.ascontiguousarray(values[top:bottom, left:right])
    height, width = part.shape
    shrink = min(1.0, crop_pixels / max(height, width))
    size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
    image = Image.fromarray(picture, "RGB")
    if size != (width, height):
        image = image.resize(size, Image.BOX)
        part = np.asarray(Image.fromarray(part, "F").resize(size, Image.BOX), np.float32)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    scale = float(np.abs(part).max()) if part.size else 0.0
    if not (math.isfinite(scale) and scale > 0):
        scale, part = 0.0, np.zeros_like(part)
    return {"top": top, "left": left, "bottom": bottom, "right": right, "height": part.shape[0], "width": part.shape[1],
            "image": buffer.getvalue(), "heatmap": (part / (scale or 1.0)).astype(np.float16).ravel().tolist(),
            "scale": scale}


def crop_pictures(crop: dict) -> tuple[np.ndarray, np.ndarray]:
    """A stored ``crop`` (a row's struct, as pandas gives it) -> (input (h, w, 3) float32 in [0, 1],
    conditional heatmap (h, w) float32 in relevance units)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(crop["image"])).convert("RGB"), np.float32) / 255.0
    heatmap = np.asarray(crop["heatmap"], np.float32).reshape(int(crop["height"]), int(crop["width"]))
    return image, heatmap * np.float32(crop["scale"])


# --- reading and writing ---------------------------------------------------------------------------

def references_table(chosen: pd.DataFrame, crops: dict[tuple[str, str, int], dict | None]) -> pa.Table:
    """``choose_references``' rows with their crop ((image_id, layer, neuron) -> ``CROP`` value, None
    for an image that no longer decodes) as a ``REFERENCE_ROWS`` table."""
    crop = [crops.get((image_id, layer, int(neuron))) for image_id, layer, neuron
            in zip(chosen["image_id"], chosen["layer"], chosen["neuron"])]
    columns = {name: pa.array(chosen[name], REFERENCE_ROWS.field(name).type, from_pandas=True)
               for name in REFERENCE_ROWS.names if name != "crop"}
    return pa.table({**columns, "crop": pa.array(crop, CROP)}, schema=REFERENCE_ROWS)


def write_references(run: RunStore, table: pa.Table, settings: ReferenceSettings, record: dict) -> None:
    """``classes/references.parquet``, then ``references.json`` (the settings and ``record``: the
    channel layer, counts, time), which marks it complete."""
    run.write_parquet(f"{CLASSES}/{REFERENCES}", table)
    run.write_bytes(f"{CLASSES}/{REFERENCE_SETTINGS}", json.dumps({"settings": settings.to_dict(), **record},
                                                                  indent=2).encode())


def read_references(run: RunStore, layer: str | None = None, neuron: int | None = None) -> pd.DataFrame:
    """The references table (complete ones only: empty without ``references.json``), optionally
    of one layer and neuron, with the filter pushed down."""
    if not run.is_file(CLASSES, REFERENCE_SETTINGS):
        return REFERENCE_ROWS.empty_table().to_pandas()
    filters = ([("layer", "==", layer)] if layer is not None else []) + (
        [("neuron", "==", int(neuron))] if neuron is not None else [])
    return run.read_parquet(f"{CLASSES}/{REFERENCES}", filters=filters or None).to_pandas()

