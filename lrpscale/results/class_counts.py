"""Dense per-class accumulators of the reducer.

Each folds one flat table of a run into numpy arrays indexed by class row, whose size is fixed
by the number of classes and the layers' widths, never by the number of images: a run of 1.28M
images needs the same memory as one of 128k. Sparse tables of every (class, key) pair seen
would grow with the images until they reach the same bound, at several times the cost per pair.

``ClassIndex`` gives every class a row once (the images pass sees them all), so the arrays of
different tables line up.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lrpscale.graph import OUTPUT

BY = ("label", "pred")  # the two groupings: by true label and by prediction


def class_order(name: str):
    """Sort key of class names: numbers by value first ("2" before "10"), then other names."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _encoded(column: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.cast(pa.string()).dictionary_encode()


class ClassIndex:
    """Class name -> row of the dense arrays, per grouping (predictions are named by their index)."""

    def __init__(self):
        self.rows: dict[str, dict[str, int]] = {by: {} for by in BY}

    def lookup(self, column: pa.ChunkedArray | pa.Array, by: str, add: bool = False) -> np.ndarray:
        """(rows,) int64 class row of every entry; -1 for nulls and, unless ``add``, unknown classes."""
        encoded = _encoded(column)
        index = self.rows[by]
        names = encoded.dictionary.to_pylist()
        rows = [index.setdefault(c, len(index)) if add else index.get(c, -1) for c in names]
        lookup = np.array(rows + [-1], np.int64)
        return lookup[encoded.indices.fill_null(len(names)).to_numpy()]

    def size(self, by: str) -> int:
        return len(self.rows[by])

    def names(self, by: str) -> np.ndarray:
        return np.array(list(self.rows[by]), dtype=object)


def _bincount(flat: np.ndarray, shape: tuple[int, ...], weights: np.ndarray | None = None) -> np.ndarray:
    size = int(np.prod(shape))
    return np.bincount(flat, weights=weights, minlength=size).reshape(shape)


def _padded(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """array, zero-padded to at least ``shape`` (the same array when it is large enough)."""
    if array.shape[0] >= shape[0] and array.shape[1] >= shape[1]:
        return array
    grown = np.zeros((max(array.shape[0], shape[0]), max(array.shape[1], shape[1])), array.dtype)
    grown[:array.shape[0], :array.shape[1]] = array
    return grown


def _layers(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    encoded = _encoded(column)
    return encoded.indices.to_numpy(), encoded.dictionary.to_pylist()


def _ranked(count: np.ndarray, relevance: np.ndarray, per_row: int) -> np.ndarray:
    """(rows, per_row) column ids of each row's largest counts (ties: larger relevance / count,
    then the lower id); -1 pads rows with fewer non-zero counts."""
    rows, ids = np.nonzero(count)
    seen = count[rows, ids]
    order = np.lexsort((ids, -relevance[rows, ids] / seen, -seen, rows))
    rows, ids = rows[order], ids[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its row
    top = np.full((count.shape[0], per_row), -1, np.int64)
    keep = rank < per_row
    top[rows[keep], rank[keep]] = ids[keep]
    return top


class TargetCounts:
    """How often each class's images were explained for each output (the target logit): the
    edges to the output are counted for each class's most frequent targets only."""

    def __init__(self, index: ClassIndex):
        self.index = index
        self.counts: dict[str, np.ndarray] = {}  # by -> (classes, outputs) int64

    def add(self, chunk: pa.Table) -> None:
        """chunk: label, pred and target columns of the images table."""
        target = pc.fill_null(chunk.column("target"), -1).to_numpy()
        outputs = int(target.max(initial=-1)) + 1
        for by in BY:
            row = self.index.lookup(chunk.column(by), by, add=True)
            mine = (row >= 0) & (target >= 0)
            counts = _padded(self.counts.get(by, np.zeros((0, 0), np.int64)), (self.index.size(by), outputs))
            self.counts[by] = counts
            counts += _bincount(row[mine] * counts.shape[1] + target[mine], counts.shape)

    def top(self, by: str, per_class: int) -> np.ndarray:
        """(classes, per_class) the most frequent targets of each class, -1 padded."""
        counts = self.counts.get(by, np.zeros((self.index.size(by), 0), np.int64))
        return _ranked(counts, counts.astype(np.float64), per_class)


class NeuronCounts:
    """The neurons table folded into, per grouping and layer, (classes, neurons) arrays of
    selection counts and relevance/activation sums (VGG16 at 1,000 classes: about 0.4 GB)."""

    def __init__(self, index: ClassIndex):
        self.index = index
        self.arrays: dict[tuple[str, str], list[np.ndarray]] = {}  # (by, layer) -> [count, relevance, activation]

    def add(self, chunk: pa.Table) -> None:
        """chunk: label, pred, layer, neuron, relevance, activation columns of the neurons table."""
        neuron = chunk.column("neuron").to_numpy()
        values = [chunk.column(name).to_numpy().astype(np.float64) for name in ("relevance", "activation")]
        codes, layers = _layers(chunk.column("layer"))
        for by in BY:
            row = self.index.lookup(chunk.column(by), by, add=True)
            for code, layer in enumerate(layers):
                mine = (codes == code) & (row >= 0)
                if mine.any():
                    self._add(by, layer, row[mine], neuron[mine], [v[mine] for v in values])

    def _add(self, by: str, layer: str, row: np.ndarray, neuron: np.ndarray, values: list[np.ndarray]) -> None:
        arrays = self._sized(by, layer, self.index.size(by), int(neuron.max()) + 1)
        flat = row * arrays[0].shape[1] + neuron
        arrays[0] += _bincount(flat, arrays[0].shape).astype(np.int32)
        for total, value in zip(arrays[1:], values):
            total += _bincount(flat, total.shape, value)

    def _sized(self, by: str, layer: str, classes: int, width: int) -> list[np.ndarray]:
        """The arrays of (by, layer), grown to hold ``classes`` x ``width``."""
        empty = [np.zeros((0, 0), np.int32), np.zeros((0, 0)), np.zeros((0, 0))]
        arrays = [_padded(a, (classes, width)) for a in self.arrays.get((by, layer), empty)]
        self.arrays[(by, layer)] = arrays
        return arrays

    def width(self, by: str, layer: str) -> int:
        return self.arrays[(by, layer)][0].shape[1] if (by, layer) in self.arrays else 0

    def top(self, per_layer: int) -> dict[tuple[str, str], np.ndarray]:
        """(by, layer) -> (classes, per_layer) each class's most frequently selected neurons, in
        ``class_graph``'s order (ties: higher mean relevance, then lower neuron), -1 padded."""
        return {key: _ranked(count, relevance, per_layer) for key, (count, relevance, _) in sorted(self.arrays.items())}

    def frame(self, by: str, layer: str, rows: np.ndarray, neurons: np.ndarray, images_of: pd.DataFrame) -> pd.DataFrame:
        """nodes rows for the given (class row, neuron) pairs: count, frequency, mean relevance and activation."""
        count, relevance, activation = (a[rows, neurons] for a in self.arrays[(by, layer)])
        frame = pd.DataFrame({"by": by, "class": self.index.names(by)[rows], "layer": layer,
                              "neuron": neurons.astype(np.int32), "count": count.astype(np.int64)})
        frame = frame.merge(images_of, on=["by", "class"], how="left")
        frame["frequency"] = frame["count"] / frame["class_images"].clip(lower=1)
        frame["mean_relevance"] = relevance / count
        frame["mean_activation"] = activation / count
        return frame

    def selected(self):
        """(by, layer, (class rows, neurons)) of every neuron selected at least once, one
        (grouping, layer) at a time."""
        for (by, layer), arrays in sorted(self.arrays.items()):
            yield by, layer, np.nonzero(arrays[0])

    def strongest(self, top: dict[tuple[str, str], np.ndarray], images_of: pd.DataFrame) -> pd.DataFrame:
        """The nodes rows of the neurons in ``top`` (as ``top()`` returns them): each class's
        strongest neurons per layer."""
        parts = []
        for (by, layer), ids in top.items():
            rows, slots = np.nonzero(ids >= 0)
            parts.append(self.frame(by, layer, rows, ids[rows, slots], images_of))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["by", "class", "layer", "neuron", "count", "class_images", "frequency", "mean_relevance",
                     "mean_activation"])


class EdgeCounts:
    """Critical-path edges among each class's strongest neurons, folded into (classes, E, E)
    arrays of counts and relevance sums per grouping and layer pair (E = ``top`` neurons per
    layer, or targets for the edges to the output)."""

    def __init__(self, index: ClassIndex, top: dict[tuple[str, str], np.ndarray], targets: dict[str, np.ndarray],
                 widths: dict[tuple[str, str], int]):
        self.index = index
        # (by, layer) -> (classes, E) neuron id per slot; OUTPUT's slots are targets
        self.members = dict(top)
        self.members.update({(by, OUTPUT): ids for by, ids in targets.items()})
        self.slots = {key: self._slots(ids, widths.get(key, int(ids.max(initial=-1)) + 1))
                      for key, ids in self.members.items()}
        self.arrays: dict[tuple[str, str, str], list[np.ndarray]] = {}  # (by, lower, upper) -> [count, relevance]

    @staticmethod
    def _slots(ids: np.ndarray, width: int) -> np.ndarray:
        """(classes, width) slot of each neuron in its class's members, -1 when not a member."""
        slots = np.full((ids.shape[0], width + 1), -1, np.int16)  # the last column: ids out of range
        rows, slot = np.nonzero(ids >= 0)
        slots[rows, ids[rows, slot]] = slot
        return slots

    def _slot_of(self, by: str, layer: str, row: np.ndarray, neuron: np.ndarray) -> np.ndarray:
        slots = self.slots.get((by, layer))
        if slots is None:
            return np.full(len(row), -1, np.int64)
        width = slots.shape[1] - 1
        slot = np.full(len(row), -1, np.int64)
        inside = row < slots.shape[0]  # a class first seen after the members were ranked has none
        column = np.where((neuron >= 0) & (neuron < width), neuron, width)
        slot[inside] = slots[row[inside], column[inside]]
        return slot

    def add(self, chunk: pa.Table) -> None:
        """chunk: label, pred, layer_from, neuron_from, layer_to, neuron_to, relevance of the edges table."""
        lower_codes, lower_names = _layers(chunk.column("layer_from"))
        upper_codes, upper_names = _layers(chunk.column("layer_to"))
        pair = lower_codes.astype(np.int64) * len(upper_names) + upper_codes
        lower_ids, upper_ids = chunk.column("neuron_from").to_numpy(), chunk.column("neuron_to").to_numpy()
        relevance = chunk.column("relevance").to_numpy().astype(np.float64)
        for by in BY:
            row = self.index.lookup(chunk.column(by), by)
            for code in np.unique(pair):
                lower, upper = lower_names[code // len(upper_names)], upper_names[code % len(upper_names)]
                mine = np.flatnonzero((pair == code) & (row >= 0))
                a = self._slot_of(by, lower, row[mine], lower_ids[mine])
                b = self._slot_of(by, upper, row[mine], upper_ids[mine])
                kept = (a >= 0) & (b >= 0)
                if kept.any():
                    self._add(by, lower, upper, row[mine][kept], a[kept], b[kept], relevance[mine][kept])

    def _add(self, by, lower, upper, row, a, b, relevance) -> None:
        key = (by, lower, upper)
        if key not in self.arrays:
            shape = (self.index.size(by), self.members[(by, lower)].shape[1], self.members[(by, upper)].shape[1])
            self.arrays[key] = [np.zeros(shape, np.int32), np.zeros(shape)]
        count, total = self.arrays[key]
        flat = (row * count.shape[1] + a) * count.shape[2] + b
        count += _bincount(flat, count.shape).astype(np.int32)
        total += _bincount(flat, total.shape, relevance)

    def stats(self) -> pd.DataFrame:
        """One row per (by, class, layer_from, neuron_from, layer_to, neuron_to) seen: count and sum_relevance."""
        parts = []
        for (by, lower, upper), (count, total) in sorted(self.arrays.items()):
            row, a, b = np.nonzero(count)
            parts.append(pd.DataFrame({
                "by": by, "class": self.index.names(by)[row],
                "layer_from": lower, "neuron_from": self.members[(by, lower)][row, a].astype(np.int32),
                "layer_to": upper, "neuron_to": self.members[(by, upper)][row, b].astype(np.int32),
                "count": count[row, a, b].astype(np.int64), "sum_relevance": total[row, a, b]}))
        columns = ["by", "class", "layer_from", "neuron_from", "layer_to", "neuron_to", "count", "sum_relevance"]
        if not parts:
            return pd.DataFrame(columns=columns)
        return pd.concat(parts, ignore_index=True)[columns]
