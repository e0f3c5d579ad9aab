"""Decoding listed inputs into model input: read each row's bytes with its source's reader,
decode with PIL under a pixel limit, preprocess; an input that fails becomes an error row.
Runs in Ray's CPU tasks, so it imports no torch.
"""
from __future__ import annotations

import io
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
from PIL import Image

from lrpscale.config import DEFAULT_MAX_PIXELS
from lrpscale.inputs.errors import ERROR_COLUMNS, ERROR_FIELDS, InputError
from lrpscale.inputs.preprocess import as_displayed, model_pixels, normalise
from lrpscale.inputs.sources import LOCATOR_COLUMNS, Locator, get_source


@contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL reads its limit from a module global and only warns between 1x and 2x of it: set it
    while one image opens and make the warning an error. Not thread-safe; decode in processes."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> a fully loaded PIL image in its own mode, turned as displayed (its
    EXIF orientation applied, see ``as_displayed``); raises InputError (stage "decode").

    Messages say what went wrong and how big the data is, never what it contains: the bytes may
    come from any file a link points at.
    """
    try:
        with _pixel_limit(max_pixels):
            image = Image.open(io.BytesIO(data))
            image.load()  # decode every pixel now, so a truncated file fails here
        return as_displayed(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError("decode", "decompression_bomb", f"more than max_pixels={max_pixels} pixels "
                         f"(PIL: {_without_bytes(str(error))}); raise max_pixels (--set max_pixels=N on the command "
                         f"line) if the image is genuine") from None
    except Image.UnidentifiedImageError:
        raise InputError("decode", "not_an_image", f"{len(data)} bytes that PIL cannot identify as an image"
                         f"{_looks_like(data)}") from None
    except Exception as error:  # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, ...
        truncated = isinstance(error, EOFError) or "truncated" in str(error).lower()
        raise InputError("decode", "truncated" if truncated else "corrupt",
                         f"{type(error).__name__}: {_without_bytes(str(error))} ({len(data)} bytes)") from None


# What undecodable data may be, told from its first bytes by name only (never quoting them)
_KNOWN_KINDS = ((b"\x1f\x8b", "gzip-compressed data"), (b"PK\x03\x04", "a zip archive"), (b"%PDF", "a PDF document"),
                (b"\x28\xb5\x2f\xfd", "zstd-compressed data"), (b"BZh", "bzip2-compressed data"),
                (b"\xfd7zXZ\x00", "xz-compressed data"), (b"\x7fELF", "an executable (ELF)"))


def _looks_like(data: bytes) -> str:
    """A phrase saying what data that is not an image seems to be ("; it looks like text"), or ""."""
    kind = next((name for magic, name in _KNOWN_KINDS if data.startswith(magic)), None)
    if kind is None and data[257:262] == b"ustar":
        kind = "a tar archive"
    if kind is None and _reads_as_text(data[:4096]):
        kind = "text"
    return f"; it looks like {kind}" if kind else ""


def _reads_as_text(head: bytes) -> bool:
    """Whether bytes read as UTF-8 text without control characters (but tabs and line breaks);
    a multi-byte character cut at the end of ``head`` still counts."""
    text = head.decode("utf-8", errors="ignore")
    return bool(text) and len(text.encode("utf-8")) >= len(head) - 3 and all(
        char.isprintable() or char in "\t\n\r" for char in text)


def _without_bytes(text: str) -> str:
    """An error message with any Python bytes literal in it (``b'...'``, as some PIL plugins quote
    the chunk they stumbled on) replaced by ``<bytes>``, so file contents never reach a table."""
    return re.sub(r"""b(['"])(?:\\.|(?!\1).)*\1""", "<bytes>", text)


def decode_batch(batch: dict[str, np.ndarray], image_size: int, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Read and decode a batch of listing rows (numpy columns) into
    (3, S, S) uint8 pictures, not yet normalised (``preprocess.normalise``).

    Returns every input row, in order: the locator columns are dropped, every other column
    passes through, and it adds ``ok`` (bool, (B,)), ``pixels`` (uint8, (B, 3, S, S), zeros
    where not ok) and ``error_stage``/``error_type``/``error_message`` (object, None where ok).
    Rows that arrive with an error from the listing stay errors. ``split_errors`` separates
    the rows for the model from those for the ``errors`` table.
    """
    count = len(batch["image_id"])
    listed = [batch.get(name, [None] * count) for name in ERROR_FIELDS]
    errors: list[InputError | None] = [InputError(stage, error_type, message) if stage else None
                                       for stage, error_type, message in zip(*listed)]
    pixels = np.zeros((count, 3, image_size, image_size), dtype=np.uint8)
    for index, data in _read_rows(batch, [i for i in range(count) if errors[i] is None]).items():
        if isinstance(data, InputError):
            errors[index] = data
            continue
        try:
            pixels[index] = _model_pixels(data, image_size, max_pixels)
        except InputError as error:
            errors[index] = error
    out = {name: column for name, column in batch.items() if name not in LOCATOR_COLUMNS}
    out["ok"] = np.array([error is None for error in errors], dtype=bool)
    out["pixels"] = pixels
    for name, field in zip(ERROR_FIELDS, ("stage", "error_type", "message")):
        out[name] = np.array([getattr(error, field) if error else None for error in errors], dtype=object)
    return out


def decode_rows(rows: pa.Table, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Listing rows as an Arrow table (a shard of a run) -> ``decode_batch``'s numpy columns. The
    audit runs it as a Ray task; it lives here, away from torch, so a decode worker never loads torch."""
    columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    return decode_batch(columns, image_size, max_pixels=max_pixels)


def load_batch(batch: dict[str, np.ndarray], image_size: int, mean: Sequence[float], std: Sequence[float],
               *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """``decode_batch`` with ``pixels`` normalised: (B, 3, S, S) float32 model input (zeros
    where not ok), for callers that feed a model in the same process."""
    out = decode_batch(batch, image_size, max_pixels=max_pixels)
    ok = out["ok"]
    pixels = np.zeros(out["pixels"].shape, dtype=np.float32)
    pixels[ok] = normalise(out["pixels"][ok], mean, std)
    out["pixels"] = pixels
    return out


def _model_pixels(data: bytes, image_size: int, max_pixels: int | None) -> np.ndarray:
    """Encoded bytes -> (3, S, S) uint8; raises InputError (stage "decode" or "preprocess")."""
    image = decode(data, max_pixels)
    try:
        return model_pixels(image, image_size)
    except Exception as error:
        raise InputError("preprocess", "unconvertible", f"{image.mode} image of size {image.size}: "
                         f"{type(error).__name__}: {_without_bytes(str(error))}") from None


def split_errors(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A ``load_batch`` output -> (rows for the model, rows for the ``errors`` table).

    The first keeps every column but ``ok`` and the error columns; the second has ERROR_COLUMNS.
    """
    ok = np.asarray(batch["ok"], dtype=bool)
    good = {name: column[ok] for name, column in batch.items() if name != "ok" and name not in ERROR_FIELDS}
    bad = {name: np.asarray(batch[name], dtype=object)[~ok] for name in ERROR_COLUMNS}
    return good, bad


def _read_rows(batch: dict[str, np.ndarray], indices: list[int]) -> dict[int, bytes | InputError]:
    """Bytes (or the read error) for each row index, calling each source's reader once per file."""
    by_file: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index in indices:
        by_file[(batch["source"][index], batch["path"][index])].append(index)
    results: dict[int, bytes | InputError] = {}
    for (source, path), rows in by_file.items():
        locators = [Locator(batch["member"][i], int(batch["row"][i]), int(batch["offset"][i]), int(batch["size"][i]))
                    for i in rows]
        try:
            values = get_source(source).read(path, locators)
        except Exception as error:  # a reader bug or an odd file system must not sink the batch
            values = [InputError("read", "unreadable", f"{source} reader failed on {path}: "
                                 f"{type(error).__name__}: {_without_bytes(str(error))}")] * len(rows)
        results.update(zip(rows, values))
    return results


