"""Input sources: list a dataset's images cheaply once, then read, decode and preprocess them in batches.

``list_inputs(spec)`` runs once on the driver and returns one Arrow row per image (no image is
decoded and no image bytes are kept). ``load_batch`` runs in CPU tasks on batches of those rows
and adds the model input; an image that cannot be read, decoded or preprocessed becomes an
error row instead of failing the batch.

Sources, registered by short name in ``SOURCES`` and auto-detected from the spec by
``detect_kind`` (``kind=`` overrides):

========== ===================================================== ==========================
kind       spec                                                  image_id (stable)
========== ===================================================== ==========================
folder     a directory of images, recursive; label = first-level  path relative to the root,
           subfolder (null for files in the root); hidden files   ``cat/001.png``
           and folders are skipped
manifest   a CSV/TSV or Parquet file with a ``uri`` column,       the ``image_id``/``id``
           optional ``label`` and ``image_id``/``id`` columns;    column, else the uri as
           relative uris resolve against the manifest's folder;   written, normalised
           a uri listed twice is listed once (first row wins)     (``./a/b.png`` -> ``a/b.png``)
parquet    a Parquet file, directory or glob with an image-bytes  the ``image_id``/``id``
           column (binary, or a HuggingFace ``{bytes, path}``     column, else
           struct); optional ``label`` (HuggingFace class names   ``<file relative to root>#<row>``
           are applied) and ``image_id``/``id`` columns
webdataset ``.tar`` shards: a file, directory, glob or brace       ``<shard relative to root>#<key>``
           range (``train-{000..009}.tar``); members grouped by
           key; label from a ``cls``/``label``/``txt`` member
========== ===================================================== ==========================

The root is the directory named, a file's folder, or a pattern's folder before its first
wildcard, so ids survive copying the dataset elsewhere. ``uri`` is the absolute location a
human opens: the file, ``<parquet file>#<row>``, or ``<shard>#<member>``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff",
                    "ppm", "pgm", "pbm", "pnm")
LABEL_EXTENSIONS = ("cls", "label", "txt")  # WebDataset members that carry the label, first wins
ID_COLUMNS = ("image_id", "id")
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "img", "jpg", "png")

ERROR_FIELDS = ("error_stage", "error_type", "error_message")
ERROR_COLUMNS = ("image_id", "uri", "label") + ERROR_FIELDS
# Where a row came from, for the source's reader; unused fields are "" or -1 (never null: Ray
# hands nullable ints to batches as floats).
LOCATOR_COLUMNS = ("source", "path", "member", "row", "offset", "size")

LISTING_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("label", pa.string()),
    ("source", pa.string()),   # the SOURCES key whose reader fetches the bytes
    ("path", pa.string()),     # the image file, Parquet file or tar shard
    ("member", pa.string()),   # tar member name, or the Parquet image column
    ("row", pa.int64()),       # row in the Parquet file
    ("offset", pa.int64()),    # byte offset of the tar member's data
    ("size", pa.int64()),      # byte size of the tar member
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])

ERROR_STAGES = ("list", "read", "decode", "preprocess")
ERROR_TYPES = {
    "invalid_uri": "a manifest row whose uri is empty or not a local path",
    "no_image_member": "a WebDataset sample without an image member",
    "missing": "the file, Parquet row or tar shard is not there",
    "empty": "zero bytes (or null bytes in a Parquet image column)",
    "unreadable": "the file exists but cannot be opened or read (permissions, a directory, a corrupt container)",
    "truncated": "the data ends early: a short tar member or an image file cut off",
    "not_an_image": "bytes PIL cannot identify as any image format",
    "corrupt": "a recognised image format whose data PIL cannot decode",
    "decompression_bomb": "width x height above max_pixels",
    "unconvertible": "decoded, but conversion to the model input failed",
}


class InputError(Exception):
    """Why one input could not become model input: a stage (ERROR_STAGES), a type (ERROR_TYPES), a message."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message


def error_row(image_id: str, uri: str, label: str | None, stage: str, error_type: str,
              message: str) -> dict[str, str | None]:
    """One row of the ``errors`` table (columns ERROR_COLUMNS), for problems found outside ``load_batch``."""
    return {"image_id": image_id, "uri": uri, "label": label, "error_stage": stage,
            "error_type": error_type, "error_message": message}


# ---------------------------------------------------------------------------------------------
# Listing


class _Listing:
    """The listing table of one source, built a row at a time as plain column lists."""

    def __init__(self, source: str):
        self.source = source
        self.columns: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}

    def add(self, image_id: str, uri: str, label: str | None, path: str, *, member: str = "",
            row: int = -1, offset: int = -1, size: int = -1) -> None:
        self._append(image_id=image_id, uri=uri, label=label, source=self.source, path=path,
                     member=member, row=row, offset=offset, size=size, error_stage=None,
                     error_type=None, error_message=None)

    def add_error(self, image_id: str, uri: str, label: str | None, error_type: str, message: str) -> None:
        """A row the listing already knows is bad; ``load_batch`` passes it through as an error."""
        self._append(source=self.source, path="", member="", row=-1, offset=-1, size=-1,
                     **error_row(image_id, uri, label, "list", error_type, message))

    def _append(self, **values) -> None:
        for name, value in values.items():
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=LISTING_SCHEMA)


def list_folder(spec: str) -> pa.Table:
    """Every image file under the directory ``spec``, sorted by relative path."""
    root = os.path.abspath(spec)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"folder input {spec!r} is not a directory; pass a directory of images "
                                 f"or choose another kind ({', '.join(SOURCES)})")
    listing = _Listing("folder")
    for relative in sorted(_walk(root, IMAGE_EXTENSIONS)):
        parts = relative.split("/")
        path = os.path.join(root, *parts)
        listing.add(relative, path, parts[0] if len(parts) > 1 else None, path)
    return listing.table()


def list_manifest(spec: str, uri_column: str = "uri", label_column: str = "label",
                  id_column: str | None = None) -> pa.Table:
    """The images a CSV/TSV/Parquet manifest names, in manifest order, each resolved path once.

    A row with an empty or non-local uri becomes a ``list`` error row. A row with an empty id
    cell falls back to the uri rule.
    """
    manifest = os.path.abspath(spec)
    columns = _read_manifest(manifest)
    if uri_column not in columns:
        raise ValueError(f"manifest {spec!r} has no {uri_column!r} column (it has {list(columns)}); "
                         f"rename the column or pass uri_column=")
    id_column = id_column or next((name for name in ID_COLUMNS if name in columns), None)
    uris = [_as_text(value) for value in columns[uri_column]]
    labels = [_as_text(value) for value in columns[label_column]] if label_column in columns else [None] * len(uris)
    ids = [_as_text(value) for value in columns[id_column]] if id_column else [None] * len(uris)
    base = os.path.dirname(manifest)
    listing = _Listing("manifest")
    seen: set[str] = set()  # resolved paths, and the uris that could not be resolved
    for number, (uri, label, given_id) in enumerate(zip(uris, labels, ids)):
        if uri is None:
            listing.add_error(given_id or f"{os.path.basename(manifest)}#{number}", f"{manifest}#{number}", label,
                              "invalid_uri", f"row {number} of manifest {manifest} has an empty {uri_column!r}; "
                              f"fill it in or drop the row")
            continue
        try:
            path = _local_path(uri, base)
        except InputError as error:
            if uri not in seen:
                seen.add(uri)
                listing.add_error(given_id or uri, uri, label, error.error_type, error.message)
            continue
        if path not in seen:
            seen.add(path)
            listing.add(given_id or _normalise_uri(uri), path, label, path)
    return listing.table()


def list_parquet(spec: str, image_column: str | None = None, label_column: str = "label",
                 id_column: str | None = None) -> pa.Table:
    """One row per row of each Parquet file, reading only the label and id columns.

    The image column is ``image_column`` or found by ``find_image_column``. A file that cannot be
    opened becomes one ``list`` error row.
    """
    root, files = _data_files(spec, ".parquet")
    listing = _Listing("parquet")
    for file in files:
        relative = _relative(file, root)
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as error:
            listing.add_error(relative, file, None, "unreadable", f"cannot open parquet file {file}: {error}")
            continue
        schema = parquet.schema_arrow
        column = image_column or find_image_column(schema)
        if column is None or column not in schema.names or not _holds_bytes(schema.field(column).type):
            raise ValueError(f"parquet file {file} has no image-bytes column {column or ''} (binary, or a struct "
                             f"with a binary 'bytes' field; its columns: {schema.names}); name it with image_column=")
        ids_from = id_column or next((name for name in ID_COLUMNS if name in schema.names), None)
        wanted = [name for name in (label_column, ids_from) if name and name in schema.names]
        small = parquet.read(columns=wanted) if wanted else None
        count = parquet.metadata.num_rows
        labels = (_class_labels(small.column(label_column).to_pylist(), _class_names(schema, label_column))
                  if label_column in wanted else [None] * count)
        ids = ([_as_text(value) for value in small.column(ids_from).to_pylist()]
               if ids_from in wanted else [None] * count)
        for row, (label, given_id) in enumerate(zip(labels, ids)):
            listing.add(given_id or f"{relative}#{row}", f"{file}#{row}", label, file, member=column, row=row)
    return listing.table()


def list_webdataset(spec: str) -> pa.Table:
    """One row per sample key in each uncompressed tar shard, in shard order.

    The image is the sample's first member with an IMAGE_EXTENSIONS extension; its byte offset
    is recorded so reading seeks straight to it. A sample without an image, and a shard that
    cannot be read, become ``list`` error rows.
    """
    root, shards = _data_files(spec, ".tar")
    listing = _Listing("webdataset")
    for shard in shards:
        relative = _relative(shard, root)
        try:
            samples = _tar_samples(shard)
        except (OSError, tarfile.TarError) as error:
            listing.add_error(relative, shard, None, "unreadable", f"cannot read tar shard {shard}: {error}; "
                              f"WebDataset shards must be uncompressed tar files")
            continue
        for key, (members, label) in samples.items():
            image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
            if image is None:
                listing.add_error(f"{relative}#{key}", f"{shard}#{key}", label, "no_image_member",
                                  f"sample {key!r} in {shard} has no image member (it has {sorted(members)})")
            else:
                listing.add(f"{relative}#{key}", f"{shard}#{image.name}", label, shard, member=image.name,
                            offset=image.offset_data, size=image.size)
    return listing.table()


# ---------------------------------------------------------------------------------------------
# Reading: each reader gets one file and the locators of the rows in it, and returns bytes or
# an InputError per locator, so a batch opens each file once.


class Locator(NamedTuple):
    """Where one row's bytes sit inside its file (see LISTING_SCHEMA)."""

    member: str
    row: int
    offset: int
    size: int


def read_files(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The whole file at ``path`` (an image file), for each locator."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return [InputError("read", "missing", f"no file at {path}; fix the path or remove the input")] * len(locators)
    except OSError as error:
        return [InputError("read", "unreadable", f"cannot read {path}: {error}")] * len(locators)
    if not data:
        return [InputError("read", "empty", f"{path} is a zero-byte file")] * len(locators)
    return [data] * len(locators)


def read_parquet_rows(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The image bytes of each locator's row, reading only the row groups that hold them."""
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        return [InputError("read", "missing", f"parquet file {path} is gone since it was listed")] * len(locators)
    except (OSError, pa.ArrowException) as error:
        return [InputError("read", "unreadable", f"cannot open parquet file {path}: {error}")] * len(locators)
    results: list[bytes | InputError] = [None] * len(locators)
    by_column: dict[str, list[int]] = defaultdict(list)
    for index, locator in enumerate(locators):
        if 0 <= locator.row < parquet.metadata.num_rows:
            by_column[locator.member].append(index)
        else:
            results[index] = InputError("read", "missing", f"{path} has no row {locator.row} (it has "
                                        f"{parquet.metadata.num_rows}); it changed since it was listed")
    for column, indices in by_column.items():
        try:
            values = _take_rows(parquet, column, [locators[index].row for index in indices])
        except (KeyError, OSError, pa.ArrowException) as error:
            failure = InputError("read", "unreadable", f"cannot read column {column!r} of {path}: {error}")
            values = [failure] * len(indices)
        for index, value in zip(indices, values):
            if isinstance(value, InputError):
                results[index] = value
            elif not value:
                results[index] = InputError("read", "empty", f"{path} row {locators[index].row}: "
                                            f"{'null' if value is None else 'zero-length'} bytes in column {column!r}")
            else:
                results[index] = value
    return results


def read_tar_members(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The data of each locator's tar member, by seeking to its recorded offset."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return [InputError("read", "missing", f"tar shard {path} is gone since it was listed")] * len(locators)
    except OSError as error:
        return [InputError("read", "unreadable", f"cannot open tar shard {path}: {error}")] * len(locators)
    results: list[bytes | InputError] = []
    with handle:
        for locator in locators:
            if locator.size == 0:
                results.append(InputError("read", "empty", f"member {locator.member} of {path} is zero bytes"))
                continue
            handle.seek(locator.offset)
            data = handle.read(locator.size)
            if len(data) < locator.size:
                results.append(InputError("read", "truncated", f"{path} ends {len(data)} of {locator.size} "
                                          f"bytes into member {locator.member}"))
            else:
                results.append(data)
    return results


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Source:
    """One kind of input: how to list a spec, and how to read the bytes of listed rows."""

    name: str
    list: Callable[..., pa.Table]
    read: Callable[[str, Sequence[Locator]], list]
    description: str = ""


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise KeyError(f"unknown input kind {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


register(Source("folder", list_folder, read_files, "a directory of images, labels from first-level subfolders"))
register(Source("manifest", list_manifest, read_files, "a CSV/TSV/Parquet file with uri and optional label columns"))
register(Source("parquet", list_parquet, read_parquet_rows, "Parquet files with an image-bytes column"))
register(Source("webdataset", list_webdataset, read_tar_members, "WebDataset .tar shards"))


def detect_kind(spec: str) -> str:
    """The SOURCES key for a spec: a directory holding image files is a ``folder`` (else Parquet
    files make it ``parquet``, tar files ``webdataset``); ``.csv``/``.tsv`` is a ``manifest``; a
    ``.parquet`` file is ``parquet`` if it has an image-bytes column, else a ``manifest`` if it
    has a ``uri`` column; ``.tar`` files and patterns of them are ``webdataset``."""
    if _is_pattern(spec) and not os.path.exists(spec):
        suffixes = {os.path.splitext(file)[1].lower() for file in _match(spec)}
        if suffixes == {".tar"}:
            return "webdataset"
        if suffixes == {".parquet"}:
            return "parquet"
        raise ValueError(f"pattern {spec!r} matches {sorted(suffixes) or 'nothing'}; "
                         f"it must match only .tar shards or only .parquet files")
    if os.path.isdir(spec):
        found = set()
        for relative in _walk(os.path.abspath(spec), IMAGE_EXTENSIONS + ("parquet", "tar")):
            extension = relative.rsplit(".", 1)[-1].lower()
            if extension in IMAGE_EXTENSIONS:
                return "folder"
            found.add(extension)
        if "parquet" in found:
            return "parquet"
        if "tar" in found:
            return "webdataset"
        raise ValueError(f"directory {spec!r} holds no image files, .parquet files or .tar shards")
    if os.path.isfile(spec):
        extension = os.path.splitext(spec)[1].lower()
        if extension in (".csv", ".tsv"):
            return "manifest"
        if extension == ".tar":
            return "webdataset"
        if extension == ".parquet":
            schema = pq.read_schema(spec)
            if find_image_column(schema):
                return "parquet"
            if "uri" in schema.names:
                return "manifest"
        raise ValueError(f"cannot tell what kind of input {spec!r} is; pass kind= one of {', '.join(SOURCES)}")
    raise FileNotFoundError(f"input {spec!r} does not exist; pass a directory, a manifest, Parquet files or tar shards")


def list_inputs(spec: str | os.PathLike, kind: str | None = None, **options) -> pa.Table:
    """List a dataset: one row per input, schema LISTING_SCHEMA, in a deterministic order.

    spec: a path or pattern (see the module docstring); kind: a SOURCES key, detected if None;
    options: passed to the source's list function (e.g. ``image_column=`` for parquet,
    ``uri_column=`` for manifests). Rows the listing already knows are bad carry
    ``error_stage="list"``. Raises if the spec names nothing, holds no inputs, or gives two
    different inputs the same image_id.
    """
    spec = os.fspath(spec)
    name = kind or detect_kind(spec)
    table = get_source(name).list(spec, **options)
    if table.num_rows == 0:
        raise ValueError(f"no inputs found in {spec!r} (kind {name})")
    counts = pc.value_counts(table.column("image_id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(f"{spec!r}: image_id {repeated[0]['values'].as_py()!r} names "
                         f"{repeated[0]['counts'].as_py()} different inputs (and {len(repeated) - 1} more ids repeat); "
                         f"make the id column unique or drop it to use the uri rule")
    return table


# ---------------------------------------------------------------------------------------------
# Helpers of the sources


def find_image_column(schema: pa.Schema) -> str | None:
    """The column holding encoded images: a binary column named like IMAGE_COLUMNS, else a struct
    with a binary ``bytes`` field (HuggingFace's Image feature), else the only binary column."""
    candidates = [field.name for field in schema if _holds_bytes(field.type)]
    named = [name for name in IMAGE_COLUMNS if name in candidates]
    structs = [field.name for field in schema if pa.types.is_struct(field.type) and field.name in candidates]
    binaries = [field.name for field in schema if _is_binary(field.type)]
    return (named or structs or (binaries if len(binaries) == 1 else [None]))[0]


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _holds_bytes(kind: pa.DataType) -> bool:
    return _is_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                and _is_binary(kind.field("bytes").type))


def _take_rows(parquet: pq.ParquetFile, column: str, rows: list[int]) -> list[bytes | None]:
    """The values of ``column`` at ``rows``, reading only the row groups that contain them."""
    sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.searchsorted(starts, rows, side="right") - 1
    needed = sorted(set(groups.tolist()))
    table = parquet.read_row_groups(needed, columns=[column])
    # where each needed group begins inside the table just read
    begins = dict(zip(needed, np.concatenate([[0], np.cumsum([sizes[group] for group in needed])])))
    positions = [int(begins[group] + row - starts[group]) for row, group in zip(rows, groups)]
    values = table.column(column).take(positions)
    if pa.types.is_struct(values.type):
        values = pc.struct_field(values, "bytes")
    return values.to_pylist()


def _tar_samples(shard: str) -> dict[str, tuple[dict[str, tarfile.TarInfo], str | None]]:
    """key -> (extension -> member, label text) for the regular members of one shard, in order."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(shard, "r:") as tar:
        for info in tar:
            # WebDataset's rule: the key is the path up to the first dot of the file name; a file
            # name that starts with a dot (hidden, macOS "._" forks) has no key and is skipped
            match = re.match(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$", info.name) if info.isfile() else None
            if match:
                members.setdefault(match.group(1), {})[match.group(2).lower()] = info
        samples = {}
        for key, by_extension in members.items():
            label_member = next((by_extension[ext] for ext in LABEL_EXTENSIONS if ext in by_extension), None)
            label = (tar.extractfile(label_member).read().decode("utf-8", errors="replace").strip()
                     if label_member else None)
            samples[key] = (by_extension, label or None)
    return samples


def _read_manifest(manifest: str) -> dict[str, list]:
    """A manifest's columns as Python lists; CSV cells stay text so ids like ``007`` keep their zeros."""
    extension = os.path.splitext(manifest)[1].lower()
    if extension == ".parquet":
        return pq.read_table(manifest).to_pydict()
    if extension in (".csv", ".tsv"):
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, sep="\t" if extension == ".tsv" else ",")
        return {name: frame[name].tolist() for name in frame.columns}
    raise ValueError(f"manifest {manifest!r} must be a .csv, .tsv or .parquet file")


def _local_path(uri: str, base: str) -> str:
    """A manifest uri as an absolute local path; relative ones resolve against ``base``."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        uri = urllib.parse.unquote(parsed.path)
    elif len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise InputError("list", "invalid_uri", f"{uri!r}: only local paths and file:// uris are read; "
                         f"copy or mount the data locally")
    return os.path.normpath(os.path.join(base, os.path.expanduser(uri)))


def _normalise_uri(uri: str) -> str:
    return uri if "://" in uri else os.path.normpath(uri).replace(os.sep, "/")


def _as_text(value) -> str | None:
    """A manifest or Parquet cell as text; missing cells (None, NaN, "") are None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The class names HuggingFace ``datasets`` stores for a ClassLabel column, if any."""
    metadata = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    feature = metadata.get("info", {}).get("features", {}).get(label_column, {})
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


def _class_labels(values: list, names: list[str] | None) -> list[str | None]:
    if names is None:
        return [_as_text(value) for value in values]
    return [names[value] if isinstance(value, int) and 0 <= value < len(names) else _as_text(value)
            for value in values]


def _walk(root: str, extensions: Sequence[str]) -> Iterator[str]:
    """Relative posix paths of the non-hidden files under ``root`` with one of ``extensions``."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and "." in name and name.rsplit(".", 1)[1].lower() in extensions:
                yield _relative(os.path.join(folder, name), root)


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _is_pattern(spec: str) -> bool:
    return any(char in spec for char in "*?[{")


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``a-{000..002}.tar`` and ``{train,val}.tar`` become several patterns."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", match.group(1))
    options = ([str(number).zfill(len(span.group(1))) for number in range(int(span.group(1)), int(span.group(2)) + 1)]
               if span else match.group(1).split(","))
    return [expanded for option in options
            for expanded in _expand_braces(pattern[:match.start()] + option + pattern[match.end():])]


def _match(pattern: str) -> list[str]:
    """The files a glob/brace pattern names, sorted; a brace-named file that is absent is an error."""
    files = set()
    for expanded in _expand_braces(pattern):
        if not _is_pattern(expanded) and not os.path.isfile(expanded):
            raise FileNotFoundError(f"{expanded!r} (from {pattern!r}) does not exist; fix the pattern")
        files.update(os.path.abspath(file) for file in glob.glob(expanded) if os.path.isfile(file))
    return sorted(files)


def _data_files(spec: str, suffix: str) -> tuple[str, list[str]]:
    """(root, files) for a file, a directory (recursive) or a pattern of ``suffix`` files."""
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        files = [os.path.join(root, *relative.split("/")) for relative in sorted(_walk(root, (suffix[1:],)))]
    elif os.path.isfile(spec):
        root, files = os.path.dirname(os.path.abspath(spec)), [os.path.abspath(spec)]
    elif _is_pattern(spec):
        prefix = re.split(r"[*?\[{]", spec, maxsplit=1)[0]
        root, files = os.path.abspath(os.path.dirname(prefix) or "."), _match(spec)
    else:
        raise FileNotFoundError(f"input {spec!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no {suffix} files in {spec!r}")
    return root, files
