"""Arrow schemas of every table a run writes, in one place, and their version.

The analyser actors emit one ``RESULT`` row per input (analysed or failed) with the image's
neurons, scores, edges and deconvolutions as nested lists, built by ``result_row``. The driver
splits each committed shard into the flat tables of docs/architecture.md (``images``, ``neurons``, ``scores``,
``edges``, ``deconv``, ``errors``) that pandas reads directly. Pictures are Arrow's canonical
``fixed_shape_tensor`` so a reader can reshape them without knowing the size.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 2  # 2: the faithfulness table (the audit's region perturbation stage)
TABLES = ("images", "neurons", "scores", "edges", "deconv", "faithfulness", "errors")

_NEURON = pa.struct([("layer", pa.string()), ("neuron", pa.int32()), ("rank", pa.int16()),
                     ("relevance", pa.float32()), ("activation", pa.float32())])
_SCORE = pa.struct([("layer", pa.string()), ("k", pa.int32()), ("variant", pa.string()), ("mse", pa.float32()),
                    ("smape", pa.float32()), ("chosen", pa.bool_())])
_EDGE = pa.struct([("layer_from", pa.string()), ("neuron_from", pa.int32()), ("layer_to", pa.string()),
                   ("neuron_to", pa.int32()), ("relevance", pa.float32())])
_DECONV = pa.struct([("layer", pa.string()), ("neuron", pa.int32()), ("scale", pa.float32()),
                     ("reconstruction", pa.list_(pa.float16()))])
# one point of a region perturbation curve (docs/method.md §16): after ``step`` steps a ``fraction``
# of the patches is removed in ``order`` (morf, lerf, random); the target's logit and probability
_CURVE_POINT = pa.struct([("order", pa.string()), ("step", pa.int16()), ("fraction", pa.float32()),
                          ("logit", pa.float32()), ("prob", pa.float32())])

# the per-image columns shared by the result rows and the images table
_IMAGE_FIELDS = [
    ("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("label_index", pa.int32()),
    ("pred", pa.int32()), ("pred_label", pa.string()), ("target", pa.int32()), ("logit", pa.float32()),
    ("prob", pa.float32()), ("rel_total", pa.float32()), ("rel_pos", pa.float32()), ("rel_neg", pa.float32()),
    ("conservation_error", pa.float32()), ("heatmap_scale", pa.float32()),
]

# node_id: the Ray node of the actor that analysed the row (the driver lists a shard's nodes in its
# commit marker); like shard, it stays out of the flat tables
RESULT = pa.schema(_IMAGE_FIELDS + [
    ("shard", pa.int32()), ("node_id", pa.string()),
    ("heatmap", pa.list_(pa.float16())),
    # the first swept layer's relevance per channel over its sum of |values| (SpRAy's channel
    # features); null in rows written by a generator that does not know it
    ("channel_relevance", pa.list_(pa.float16())),
    ("neurons", pa.list_(_NEURON)),
    ("scores", pa.list_(_SCORE)),
    ("edges", pa.list_(_EDGE)),
    ("deconv", pa.list_(_DECONV)),
    ("faithfulness", pa.list_(_CURVE_POINT)),  # empty unless the image was in the perturbation sample
    ("error_stage", pa.string()), ("error_type", pa.string()), ("error_message", pa.string()),
])


def picture_type(shape: Iterable[int], value_type: pa.DataType = pa.float16()) -> pa.DataType:
    return pa.fixed_shape_tensor(value_type, list(shape))


def images_schema(heatmap_side: int, channels: int | None = None) -> pa.Schema:
    """The images table; with ``channels`` it holds the ``channel_relevance`` (C,) column, which a
    shard whose rows carry none leaves out."""
    pictures = [("heatmap", picture_type([heatmap_side, heatmap_side]))]
    if channels is not None:
        pictures.append(("channel_relevance", picture_type([channels])))
    return pa.schema(_IMAGE_FIELDS + pictures + [("model_id", pa.string()), ("run_id", pa.string())])


def _flat_schema(item: pa.StructType, extra=()) -> pa.Schema:
    return pa.schema([("image_id", pa.string()), ("label", pa.string()), ("pred", pa.int32())]
                     + [(item.field(i).name, item.field(i).type) for i in range(item.num_fields)] + list(extra))


NEURONS = _flat_schema(_NEURON)
SCORES = _flat_schema(_SCORE)
EDGES = _flat_schema(_EDGE)
FAITHFULNESS = pa.schema([("image_id", pa.string()), ("label", pa.string()), ("pred", pa.int32()),
                          ("composite", pa.string())]
                         + [(_CURVE_POINT.field(i).name, _CURVE_POINT.field(i).type) for i in range(_CURVE_POINT.num_fields)])
ERRORS = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("stage", pa.string()),
                    ("error_type", pa.string()), ("message", pa.string())])


def deconv_schema(side: int) -> pa.Schema:
    return pa.schema([("image_id", pa.string()), ("label", pa.string()), ("pred", pa.int32()), ("layer", pa.string()),
                      ("neuron", pa.int32()), ("mode", pa.string()), ("scale", pa.float32()),
                      ("reconstruction", picture_type([3, side, side]))])


def square_picture(values) -> np.ndarray:
    """A stored heatmap as a (s, s) float32 array: pandas hands a fixed_shape_tensor cell (and
    the reducer's class heatmaps) over as a flat array of s*s values; a square one passes."""
    picture = np.asarray(values, np.float32)
    if picture.ndim == 2:
        return picture
    side = int(round(picture.size ** 0.5))
    return picture.reshape(side, side)


def scaled_float16(picture: np.ndarray) -> tuple[np.ndarray, float]:
    """A picture as float16 divided by its largest |value| (kept as ``scale``): relevance values
    are often far below float16's normal range, their shape is what float16 must keep."""
    scale = float(np.abs(picture).max())
    if scale == 0 or not np.isfinite(scale):
        return np.zeros(picture.size, np.float16), 0.0
    return (picture / scale).astype(np.float16).ravel(), scale


def result_row(record: dict, pred_label: str) -> dict:
    """The one row builder: an analysed image's record (``BatchAnalysis.records()``: numbers,
    lists of neuron/score/edge dicts, ``heatmap`` (s, s), ``channel_relevance`` (C,) or None
    and ``deconv`` items with a (3, d, d) ``reconstruction``, as numpy) -> the analysis fields
    of a ``RESULT`` row. Pictures are stored as float16 scaled to max |value| 1, with their
    scale; the channel relevance, already divided by its sum of |values|, as float16."""
    heatmap, scale = scaled_float16(record["heatmap"])
    channels = record.get("channel_relevance")
    deconv = []
    for item in record["deconv"]:
        picture, picture_scale = scaled_float16(item["reconstruction"])
        deconv.append({"layer": item["layer"], "neuron": item["neuron"], "scale": picture_scale,
                       "reconstruction": picture})
    return {**{key: record[key] for key in ("pred", "target", "logit", "prob", "rel_total", "rel_pos", "rel_neg",
                                            "conservation_error", "neurons", "scores", "edges", "faithfulness")},
            "pred_label": pred_label, "heatmap": heatmap, "heatmap_scale": scale, "deconv": deconv,
            "channel_relevance": None if channels is None else np.asarray(channels, np.float32).astype(np.float16)}


def tensor_column(values: list[np.ndarray], shape: list[int], value_type: pa.DataType = pa.float16()) -> pa.Array:
    """N arrays (any shape with the right size) -> a fixed_shape_tensor column of the given shape."""
    size = int(np.prod(shape))
    dtype = value_type.to_pandas_dtype()
    flat = np.concatenate([np.asarray(v, dtype).ravel() for v in values]) if values else np.zeros(0, dtype)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), size)
    return pa.ExtensionArray.from_storage(picture_type(shape, value_type), storage)


def _fixed_tensor(lists: pa.Array, shape: list[int]) -> pa.Array:
    """A list<float16> column whose rows all hold prod(shape) values -> fixed_shape_tensor."""
    values = pc.list_flatten(lists)
    storage = pa.FixedSizeListArray.from_arrays(values.cast(pa.float16()), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(picture_type(shape), storage)


def _channel_tensor(lists: pa.Array) -> pa.Array | None:
    """The list<float16> channel relevances of a shard's analysed rows -> a fixed_shape_tensor [C]
    column (C from the data, null rows kept null), or None when no row has one."""
    lengths = pc.list_value_length(lists)
    present = lengths.drop_null()
    if len(present) == 0:
        return None
    channels = pc.min_max(present).as_py()
    if channels["min"] != channels["max"]:
        raise ValueError(f"channel relevances of {channels['min']} and {channels['max']} channels in one shard: "
                         "every image of a run is analysed at the same swept layer")
    size = channels["min"]
    # a null row contributes no values: fill it with zeros of the right length, then mark it null
    filled = pc.if_else(lists.is_valid(), lists, pa.scalar([0.0] * size, lists.type))
    storage = pa.FixedSizeListArray.from_arrays(pc.list_flatten(filled).cast(pa.float16()), size,
                                                mask=pc.invert(lists.is_valid()))
    return pa.ExtensionArray.from_storage(picture_type([size]), storage)


def _explode(rows: pa.Table, column: str) -> tuple[pa.Table, pa.StructArray]:
    """One row per item of a list<struct> column: (the owning image's id/label/pred, the items)."""
    lists = rows.column(column).combine_chunks()
    owners = rows.select(["image_id", "label", "pred"]).take(pc.list_parent_indices(lists))
    return owners, pc.list_flatten(lists)


def _flat_table(rows: pa.Table, column: str, schema: pa.Schema) -> pa.Table:
    owners, items = _explode(rows, column)
    columns = {name: owners.column(name) for name in owners.column_names}
    columns.update({items.type.field(i).name: items.field(i) for i in range(items.type.num_fields)})
    return pa.table(columns, schema=schema)


def split_result(result: pa.Table, heatmap_side: int, deconv_side: int, deconv_mode: str, model_id: str,
                 run_id: str, composite: str | None = None) -> dict[str, pa.Table]:
    """Split one shard's result rows into the flat tables (one pa.Table per name in TABLES), with
    Arrow compute only: no per-row Python, so the driver keeps up with GPU actors. ``composite``
    (the run's) fills the faithfulness table's column of that name."""
    failed = result.column("error_stage").is_valid()
    ok = result.filter(pc.invert(failed))
    bad = result.filter(failed)
    image_columns = {name: ok.column(name) for name, _ in _IMAGE_FIELDS}
    image_columns["heatmap"] = _fixed_tensor(ok.column("heatmap").combine_chunks(), [heatmap_side, heatmap_side])
    channels = _channel_tensor(ok.column("channel_relevance").combine_chunks())
    if channels is not None:
        image_columns["channel_relevance"] = channels
    image_columns["model_id"] = pa.array([model_id] * ok.num_rows, pa.string())
    image_columns["run_id"] = pa.array([run_id] * ok.num_rows, pa.string())
    schema = images_schema(heatmap_side, None if channels is None else channels.type.shape[0])
    tables = {"images": pa.table(image_columns, schema=schema),
              "neurons": _flat_table(ok, "neurons", NEURONS),
              "scores": _flat_table(ok, "scores", SCORES),
              "edges": _flat_table(ok, "edges", EDGES)}
    owners, items = _explode(ok, "deconv")
    tables["deconv"] = pa.table({
        "image_id": owners.column("image_id"), "label": owners.column("label"), "pred": owners.column("pred"),
        "layer": items.field("layer"), "neuron": items.field("neuron"),
        "mode": pa.array([deconv_mode] * len(items), pa.string()), "scale": items.field("scale"),
        "reconstruction": _fixed_tensor(items.field("reconstruction"), [3, deconv_side, deconv_side]),
    }, schema=deconv_schema(deconv_side))
    owners, points = _explode(ok, "faithfulness")
    tables["faithfulness"] = pa.table({
        **{name: owners.column(name) for name in owners.column_names},
        "composite": pa.array([composite] * len(points), pa.string()),
        **{_CURVE_POINT.field(i).name: points.field(i) for i in range(_CURVE_POINT.num_fields)}}, schema=FAITHFULNESS)
    tables["errors"] = pa.table({
        "image_id": bad.column("image_id"), "uri": bad.column("uri"), "label": bad.column("label"),
        "stage": bad.column("error_stage"), "error_type": bad.column("error_type"),
        "message": bad.column("error_message")}, schema=ERRORS)
    return tables
