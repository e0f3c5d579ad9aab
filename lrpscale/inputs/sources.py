"""Input sources: list a dataset's images cheaply once, then read, decode and preprocess them in batches.

``list_inputs(spec)`` runs once on the driver and returns one Arrow row per image (no image is
decoded and no image bytes are kept). ``load_batch`` runs in CPU tasks on batches of those rows
and adds the model input; an image that cannot be read, decoded or preprocessed becomes an
error row instead of failing the batch.

Sources, registered by short name in ``SOURCES`` and auto-detected from the spec by
``detect_kind`` (``--input-kind`` on the command line, ``kind=`` in the Python API, overrides):

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

**Object storage.** Every spec above, and every manifest uri, may be a URI of a store:
``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` (a ``file://`` URI is the local path it names).
Each is resolved by ``pyarrow.fs.FileSystem.from_uri``, one code path for every scheme, so
credentials and endpoints come from each store's standard environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (which points ``s3://`` at an
S3-compatible store such as MinIO or Ceph), ``GOOGLE_APPLICATION_CREDENTIALS``, and so on. A
folder (or a pattern's folder) is listed with one recursive listing, which the store pages, and
glob and brace patterns are matched against it (in a URI ``?`` starts the query, so only ``*``,
``[...]`` and braces are wildcards). Ids are relative to the root as on disk, so a dataset has
the same ids on disk and in a bucket; ``uri`` is the full location
(``s3://bucket/data/cat/001.png``, names percent-encoded as URIs need) and so is ``path``, which
whichever process decodes the row opens (ranged reads for tar members and Parquet row groups).
A manifest's relative uris resolve against its folder on its store; absolute ones may name any
store. A bucket that does not exist, credentials the store refuses, or a location without
inputs stop the listing with a ValueError naming the location and what to do; an object that
is gone by the time it is read is a ``read`` error row.

What a listing does with odd entries (each becomes an error row with stage ``list``, or is
skipped and counted; it never stops the listing):

* **Names that are not UTF-8** (a file name, folder name or tar member name in another
  encoding): listed. In ``image_id``, ``uri`` and ``label`` such a name keeps its bytes as
  percent-encoding: each byte that is not UTF-8, and each ``%`` of that name, becomes ``%XX``
  (``caf\\xe9.png`` -> ``caf%E9.png``); names that are valid UTF-8 are never changed, so their
  ids stay as they were. The ``path`` column (what the reader opens) holds a path that is valid
  UTF-8 as it is, else ``fs-bytes:`` followed by the path's bytes percent-encoded
  (``urllib.parse.quote_from_bytes``); ``os_path`` turns either back into the name to open. In
  the rare case that an encoded name equals another entry's valid name (``caf%E9.png`` spelled
  out), the valid name keeps the id and the encoded one is skipped (counted as
  ``name_collision``, with a warning naming it).
* **Symbolic links** under a folder root are followed. A link whose target lies inside the
  root (after resolving every link) is listed like a file or folder at the link's path, so a
  file reached through two paths is listed twice, with two ids. A link whose target lies
  outside the root is an ``outside_root`` error row unless the listing is called with
  ``follow_external_links=True`` (Python API). A folder that leads back into one of the folders
  it is inside of (``a/loop -> ..``, or a bind mount) is one ``link_loop`` error row at the
  path that closes the loop and is not entered (found by the (st_dev, st_ino) of the folders
  the walk is inside of; reached through several paths, it is one row per path, as files are);
  a chain of links without an end is also ``link_loop``. A dangling link is a ``missing`` error row when its name could be an image or a
  folder (an image extension, or none); otherwise it is skipped like any other non-image name.
* **FIFOs, sockets and devices** with an image name are ``not_a_file`` error rows and are never
  opened (a reader that opens a FIFO waits forever); readers check the file type before opening.
* **Tar shards** cut short keep their intact samples: a sample whose member runs past the end
  of the shard, or the last sample of a shard without tar's end-of-archive marker, is a
  ``truncated`` error row. A file that is not a tar at all is one error row for the shard,
  saying what it looks like (e.g. gzip-compressed). Hard-link members are read as their
  target's data (``missing`` if the target is not an earlier member); symbolic-link members and
  device/FIFO members make their sample an error row (``symlink_member``, ``not_a_file``).
* **Skipped entries** (hidden names, files with other extensions, tar members without a sample
  key, name collisions) are counted: ``list_inputs`` logs one INFO line per listing
  ("skipped 3 hidden entries, 2 files that are not images (.txt, .json)"), and the counts ride
  in the table's schema metadata; ``skipped_entries(table)`` returns them as a dict and
  ``skipped_summary(table)`` as that line, for a driver to print (both in ``lrpscale.inputs.skipped``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lrpscale.inputs.errors import InputError, error_row
from lrpscale.inputs.files import (
    _data_files,
    _file_kind,
    _Found,
    _is_pattern,
    _is_store_pattern,
    _match,
    _open_parquet,
    _open_regular,
    _store_extensions,
    _store_match,
    _store_target,
    _store_walk,
    _walk,
)
from lrpscale.inputs.names import IMAGE_EXTENSIONS, _extension, _shown, os_path, path_column, text_name, text_path
from lrpscale.inputs.skipped import SKIPPED_METADATA, _Skipped, skipped_summary
from lrpscale.inputs.tar_shards import _shard_samples
from lrpscale.locations import is_uri, join, local_path, resolve, split

log = logging.getLogger(__name__)

ID_COLUMNS = ("image_id", "id")
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "img", "jpg", "png")

# Where a row came from, for the source's reader; unused fields are "" or -1 (never null: Ray
# hands nullable ints to batches as floats).
LOCATOR_COLUMNS = ("source", "path", "member", "row", "offset", "size")

LISTING_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("label", pa.string()),
    ("source", pa.string()),   # the SOURCES key whose reader fetches the bytes
    ("path", pa.string()),     # the image file, Parquet file or tar shard (see path_column)
    ("member", pa.string()),   # tar member name, or the Parquet image column
    ("row", pa.int64()),       # row in the Parquet file
    ("offset", pa.int64()),    # byte offset of the tar member's data
    ("size", pa.int64()),      # byte size of the tar member
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])


# ---------------------------------------------------------------------------------------------
# Listing


class _Listing:
    """The listing table of one source, built a row at a time as plain column lists."""

    def __init__(self, source: str, wanted: tuple[str, str]):
        self.source = source
        self.columns: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
        self.skipped = _Skipped(wanted)  # ("an image", "images"): see _Skipped

    def add(self, image_id: str, uri: str, label: str | None, path: str, *, member: str = "",
            row: int = -1, offset: int = -1, size: int = -1) -> None:
        """A row to read; ``path`` is the OS path (stored as ``path_column`` gives it), the rest text."""
        self._append(image_id=image_id, uri=uri, label=label, source=self.source, path=path_column(path),
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
        table = pa.table(self.columns, schema=LISTING_SCHEMA)
        return table.replace_schema_metadata({SKIPPED_METADATA: self.skipped.metadata()})


def list_folder(spec: str, follow_external_links: bool = False) -> pa.Table:
    """Every image file under the directory ``spec``, sorted by image_id (see the module docstring
    for links, special files and names that are not UTF-8); a store URI is listed on its store."""
    spec = _as_spec(spec)
    listing = _Listing("folder", ("an image", "images"))
    if is_uri(spec):
        found = _store_walk(spec, IMAGE_EXTENSIONS, listing.skipped)
    else:
        root = os.path.abspath(spec)
        if not os.path.isdir(root):
            raise NotADirectoryError(f"folder input {spec!r} is not a directory; pass a directory of images "
                                     f"or choose another kind with --input-kind ({', '.join(SOURCES)})")
        found = list(_walk(root, IMAGE_EXTENSIONS, listing.skipped, follow_external_links=follow_external_links))
    dropped = _colliding_names([item.relative for item in found], spec, listing.skipped)
    kept = sorted(((text_path(item.relative), item) for item in found if item.relative not in dropped), key=lambda pair: pair[0])
    for image_id, item in kept:
        parts = image_id.split("/")
        label = parts[0] if len(parts) > 1 or item.folder else None
        if item.error:
            listing.add_error(image_id, _shown(item.path), label, item.error.error_type, item.error.message)
        else:
            listing.add(image_id, _shown(item.path), label, item.path)
    return listing.table()


def list_manifest(spec: str, uri_column: str = "uri", label_column: str = "label",
                  id_column: str | None = None, follow_external_links: bool = True) -> pa.Table:
    """The images a CSV/TSV/Parquet manifest names, in manifest order, each resolved path once.

    A uri is a local path, a ``file://`` uri, or a uri of any store pyarrow.fs reads (``s3://``,
    ...); a relative one resolves against the manifest's folder, on the manifest's store for a
    manifest there. A row with an empty uri, or one whose store cannot be resolved, becomes a
    ``list`` error row. A row with an empty id cell falls back to the uri rule.
    ``follow_external_links`` is accepted for a uniform ``list_inputs`` and has no effect: a
    manifest names its files, links included, on purpose.
    """
    spec = _as_spec(spec)
    manifest = spec if is_uri(spec) else os.path.abspath(spec)
    shown = _shown(manifest)
    base, name = split(manifest)
    columns = _read_manifest(manifest, name)
    if uri_column not in columns:
        raise ValueError(f"manifest {shown!r} has no {uri_column!r} column (it has {list(columns)}); "
                         f"rename its uri column to {uri_column!r}, or name it with uri_column= in the Python API")
    id_column = id_column or next((name for name in ID_COLUMNS if name in columns), None)
    uris = [_as_text(value) for value in columns[uri_column]]
    labels = [_as_text(value) for value in columns[label_column]] if label_column in columns else [None] * len(uris)
    ids = [_as_text(value) for value in columns[id_column]] if id_column else [None] * len(uris)
    listing = _Listing("manifest", ("an image", "images"))
    seen: set[str] = set()  # resolved paths, and the uris that could not be resolved
    stores: dict[str, str | None] = {}  # why each store the uris name cannot be resolved (None: it can)
    for number, (uri, label, given_id) in enumerate(zip(uris, labels, ids)):
        if uri is None:
            listing.add_error(given_id or f"{text_name(name)}#{number}", f"{shown}#{number}", label,
                              "invalid_uri", f"row {number} of manifest {shown} has an empty {uri_column!r}; "
                              f"fill it in or drop the row")
            continue
        try:
            path = _manifest_location(uri, base, stores)
        except InputError as error:
            if uri not in seen:
                seen.add(uri)
                listing.add_error(given_id or uri, uri, label, error.error_type, error.message)
            continue
        if path not in seen:
            seen.add(path)
            listing.add(given_id or _normalise_uri(uri), _shown(path), label, path)
    return listing.table()


class _ParquetFileRows(NamedTuple):
    """What one Parquet file of a listing gives: its rows' labels and ids, or why it gives none."""

    relative: str              # image_id prefix (text)
    shown: str                 # uri prefix (text)
    path: str                  # the OS path
    column: str = ""
    labels: list | None = None
    ids: list | None = None
    error: InputError | None = None


def list_parquet(spec: str, image_column: str | None = None, label_column: str = "label",
                 id_column: str | None = None, follow_external_links: bool = False) -> pa.Table:
    """One row per row of each Parquet file, reading only the label and id columns.

    The image column is ``image_column`` or found by ``find_image_column``. A file that cannot be
    opened becomes one ``list`` error row; so does a file without the image column, unless no
    file has one (then the input as a whole is wrong and this raises ValueError).
    """
    listing = _Listing("parquet", ("a .parquet file", ".parquet files"))
    _, found = _data_files(_as_spec(spec), ".parquet", listing.skipped, follow_external_links)
    files = [_parquet_file_rows(item, image_column, label_column, id_column) for item in found]
    if all(rows.error for rows in files):
        no_column = next((rows.error for rows in files if rows.error.error_type == "no_image_column"), None)
        if no_column:
            raise ValueError(no_column.message)
    for rows in files:
        if rows.error:
            listing.add_error(rows.relative, rows.shown, None, rows.error.error_type, rows.error.message)
            continue
        for row, (label, given_id) in enumerate(zip(rows.labels, rows.ids)):
            listing.add(given_id or f"{rows.relative}#{row}", f"{rows.shown}#{row}", label, rows.path,
                        member=rows.column, row=row)
    return listing.table()


def _parquet_file_rows(item: _Found, image_column: str | None, label_column: str,
                       id_column: str | None) -> _ParquetFileRows:
    """The image column, labels and ids of one listed Parquet file, or the error that stops it."""
    rows = _ParquetFileRows(text_path(item.relative), _shown(item.path), item.path)
    if item.error:
        return rows._replace(error=item.error)
    try:
        parquet = _open_parquet(item.path, "list")
        schema = parquet.schema_arrow
    except InputError as error:
        return rows._replace(error=error)
    except (OSError, pa.ArrowException) as error:
        return rows._replace(error=InputError("list", "unreadable", f"cannot open parquet file {rows.shown}: {error}"))
    column = image_column or find_image_column(schema)
    if column is None or column not in schema.names or not _holds_bytes(schema.field(column).type):
        return rows._replace(error=InputError("list", "no_image_column", _no_image_column(rows.shown, schema, column)))
    ids_from = id_column or next((name for name in ID_COLUMNS if name in schema.names), None)
    wanted = [name for name in (label_column, ids_from) if name and name in schema.names]
    try:
        small = parquet.read(columns=wanted) if wanted else None
    except (OSError, pa.ArrowException) as error:
        return rows._replace(error=InputError("list", "unreadable", f"cannot read the label and id columns of "
                                              f"parquet file {rows.shown}: {error}"))
    count = parquet.metadata.num_rows
    labels = (_class_labels(small.column(label_column).to_pylist(), _class_names(schema, label_column))
              if label_column in wanted else [None] * count)
    ids = [_as_text(value) for value in small.column(ids_from).to_pylist()] if ids_from in wanted else [None] * count
    return rows._replace(column=column, labels=labels, ids=ids)


def _no_image_column(shown: str, schema: pa.Schema, column: str | None) -> str:
    """Why a Parquet file has no usable image column, and the two ways to name one."""
    return (f"parquet file {shown} has no image-bytes column{f' {column}' if column else ''}: a binary column, or a "
            f"struct with a binary 'bytes' field (as HuggingFace stores images), found by the names "
            f"{', '.join(IMAGE_COLUMNS)}, or as the only binary column (its columns: {schema.names}); rename the image "
            f"column to one of those names (the command line has no option for it), or name it with image_column= "
            f"in the Python API (list_inputs(spec, image_column=...))")


def list_webdataset(spec: str, follow_external_links: bool = False) -> pa.Table:
    """One row per sample key in each uncompressed tar shard, in shard order.

    The image is the sample's first member with an IMAGE_EXTENSIONS extension; its byte offset
    is recorded so reading seeks straight to it. A sample without an image, a sample with a
    member that cannot be used (cut short, a symbolic link, ...), and a shard that cannot be
    read at all become ``list`` error rows; the intact samples of a damaged shard are listed.
    """
    listing = _Listing("webdataset", ("a .tar file", ".tar files"))
    _, found = _data_files(_as_spec(spec), ".tar", listing.skipped, follow_external_links)
    for item in found:
        relative, shown = text_path(item.relative), _shown(item.path)
        try:
            if item.error:
                raise item.error
            samples = _shard_samples(item.path, shown, listing.skipped)
        except InputError as error:
            listing.add_error(relative, shown, None, error.error_type, error.message)
            continue
        dropped = _colliding_names(samples, shown, listing.skipped)
        for key, sample in samples.items():
            if key in dropped:
                continue
            image_id, uri = f"{relative}#{text_path(key)}", f"{shown}#{text_path(key)}"
            if sample.problem:
                listing.add_error(image_id, uri, sample.label, sample.problem.error_type, sample.problem.message)
            elif sample.image is None:
                listing.add_error(image_id, uri, sample.label, "no_image_member",
                                  f"sample {text_path(key)!r} in {shown} has no image member (it has "
                                  f"{sorted(text_name(extension) for extension in sample.extensions)})")
            else:
                member = text_path(sample.image.name)
                listing.add(image_id, f"{shown}#{member}", sample.label, item.path, member=member,
                            offset=sample.image.offset, size=sample.image.size)
    return listing.table()


def _colliding_names(names: Iterable[str], spec: str, skipped: _Skipped) -> set[str]:
    """The names to leave out because their text form equals another name's: a valid UTF-8 name
    keeps its text, a percent-encoded one that spells it is dropped (with a warning and a count)."""
    owners: dict[str, str] = {}
    dropped = set()
    for name in names:
        text = text_path(name)
        owner = owners.setdefault(text, name)
        if owner != name:
            loser, owners[text] = (owner, name) if name == text else (name, owner)
            dropped.add(loser)
            skipped.add("name_collision")
            log.warning("%s: %r is left out: its name with undecodable bytes percent-encoded is %r, the name of "
                        "another entry; rename one of them", spec, os.fsencode(loser), text)
    return dropped


# ---------------------------------------------------------------------------------------------
# Reading: each reader gets one file and the locators of the rows in it, and returns bytes or
# an InputError per locator, so a batch opens each file once. ``path`` is the listing's
# ``path`` column (see ``path_column``).


class Locator(NamedTuple):
    """Where one row's bytes sit inside its file (see LISTING_SCHEMA)."""

    member: str
    row: int
    offset: int
    size: int


def read_files(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The whole file at ``path`` (an image file), for each locator."""
    name = os_path(path)
    try:
        with _open_regular(name, "read", "image file") as handle:
            data = handle.read()
    except InputError as error:
        return [error] * len(locators)
    except OSError as error:
        return [InputError("read", "unreadable", f"cannot read {_shown(name)}: {error.strerror or error}")] * len(locators)
    if not data:
        return [InputError("read", "empty", f"{_shown(name)} is a zero-byte file")] * len(locators)
    return [data] * len(locators)


def read_parquet_rows(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The image bytes of each locator's row, reading only the row groups that hold them."""
    name, shown = os_path(path), _shown(os_path(path))
    try:
        parquet = _open_parquet(name, "read")
    except InputError as error:
        return [error] * len(locators)
    except (OSError, pa.ArrowException) as error:
        return [InputError("read", "unreadable", f"cannot open parquet file {shown}: {error}")] * len(locators)
    results: list[bytes | InputError] = [None] * len(locators)
    by_column: dict[str, list[int]] = defaultdict(list)
    for index, locator in enumerate(locators):
        if 0 <= locator.row < parquet.metadata.num_rows:
            by_column[locator.member].append(index)
        else:
            results[index] = InputError("read", "missing", f"{shown} has no row {locator.row} (it has "
                                        f"{parquet.metadata.num_rows}); it changed since it was listed")
    for column, indices in by_column.items():
        try:
            values = _take_rows(parquet, column, [locators[index].row for index in indices])
        except (KeyError, OSError, pa.ArrowException) as error:
            failure = InputError("read", "unreadable", f"cannot read column {column!r} of {shown}: {error}")
            values = [failure] * len(indices)
        for index, value in zip(indices, values):
            if isinstance(value, InputError):
                results[index] = value
            elif not value:
                results[index] = InputError("read", "empty", f"{shown} row {locators[index].row}: "
                                            f"{'null' if value is None else 'zero-length'} bytes in column {column!r}")
            else:
                results[index] = value
    return results


def read_tar_members(path: str, locators: Sequence[Locator]) -> list[bytes | InputError]:
    """The data of each locator's tar member, by seeking to its recorded offset (a hard link's
    locator already points at its target's data)."""
    name = os_path(path)
    shown = _shown(name)
    try:
        handle = _open_regular(name, "read", "tar shard")
    except InputError as error:
        return [error] * len(locators)
    results: list[bytes | InputError] = []
    with handle:
        for locator in locators:
            if locator.size == 0:
                results.append(InputError("read", "empty", f"member {locator.member} of {shown} is zero bytes"))
                continue
            handle.seek(locator.offset)
            data = handle.read(locator.size)
            if len(data) < locator.size:
                results.append(InputError("read", "truncated", f"{shown} ends {len(data)} of {locator.size} "
                                          f"bytes into member {locator.member}; it was cut short since it was listed"))
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
    has a ``uri`` column; ``.tar`` files and patterns of them are ``webdataset``. The same rules
    hold on a store."""
    spec = _as_spec(spec)
    if is_uri(spec):
        if _is_store_pattern(spec):
            return _kind_of_pattern(spec, [item.relative for item in _store_match(spec)[1]])
        if _store_target(spec)[2].type == pafs.FileType.Directory:
            return _kind_of_folder(spec, _store_extensions(spec))
        return _kind_of_file(spec, split(spec)[1])
    if _is_pattern(spec) and not os.path.exists(spec):
        return _kind_of_pattern(spec, _match(spec))
    if os.path.isdir(spec):
        # links to elsewhere count here: detection reads names only, the listing decides what to follow
        found = _walk(os.path.abspath(spec), IMAGE_EXTENSIONS + ("parquet", "tar"), follow_external_links=True)
        return _kind_of_folder(spec, (_extension(item.relative) if item.error is None else "" for item in found))
    if os.path.isfile(spec):
        return _kind_of_file(spec, os.path.basename(spec))
    if os.path.exists(spec):
        raise ValueError(f"input {spec!r} is {_file_kind(os.stat(spec).st_mode)}, not a file or directory; "
                         f"pass a directory, a manifest, Parquet files or tar shards")
    raise FileNotFoundError(f"input {spec!r} does not exist; pass a directory, a manifest, Parquet files or tar shards")


def _kind_of_pattern(spec: str, files: Iterable[str]) -> str:
    """The kind of a glob or brace pattern from the names it matches: all .tar or all .parquet."""
    suffixes = {os.path.splitext(file)[1].lower() for file in files}
    if suffixes == {".tar"}:
        return "webdataset"
    if suffixes == {".parquet"}:
        return "parquet"
    raise ValueError(f"pattern {spec!r} matches {sorted(suffixes) or 'nothing'}; "
                     f"it must match only .tar shards or only .parquet files")


def _kind_of_folder(spec: str, extensions: Iterable[str]) -> str:
    """The kind of a folder from the extensions of what it holds ("" for entries the walk cannot
    list), read until the first image."""
    found = set()
    for extension in extensions:
        if extension in IMAGE_EXTENSIONS:
            return "folder"
        found.add(extension)
    if "parquet" in found:
        return "parquet"
    if "tar" in found:
        return "webdataset"
    raise ValueError(f"directory {spec!r} holds no image files, .parquet files or .tar shards; "
                     f"pass the folder that holds them")


def _kind_of_file(spec: str, name: str) -> str:
    """The kind of a single file from its name, and for a .parquet file from its schema."""
    extension = os.path.splitext(name)[1].lower()
    if extension in (".csv", ".tsv"):
        return "manifest"
    if extension == ".tar":
        return "webdataset"
    if extension == ".parquet":
        schema = _open_parquet(spec, "list").schema_arrow
        if find_image_column(schema):
            return "parquet"
        if "uri" in schema.names:
            return "manifest"
    raise ValueError(f"cannot tell what kind of input {spec!r} is; choose one with --input-kind on the command line "
                     f"(kind= in the Python API): {', '.join(SOURCES)}")


def list_inputs(spec: str | os.PathLike, kind: str | None = None, **options) -> pa.Table:
    """List a dataset: one row per input, schema LISTING_SCHEMA, in a deterministic order.

    spec: a path or pattern (see the module docstring); kind: a SOURCES key, detected if None;
    options: passed to the source's list function (e.g. ``image_column=`` for parquet,
    ``uri_column=`` for manifests, ``follow_external_links=True`` for folders, Parquet and tar
    directories). Rows the listing already knows are bad carry ``error_stage="list"``. The
    table's schema metadata carries what was skipped (``skipped_entries``), also logged at INFO.
    Raises if the spec names nothing, holds no inputs, or gives two different inputs the same
    image_id; on a store, a ValueError naming the location and what to do when its bucket does
    not exist or the credentials are refused.
    """
    spec = os.fspath(spec)
    name = kind or detect_kind(spec)
    table = get_source(name).list(spec, **options)
    if table.num_rows == 0:
        raise ValueError(f"no inputs found in {spec!r} (kind {name}; {skipped_summary(table)}); check that it is "
                         f"the location of the dataset, or choose another kind with --input-kind")
    counts = pc.value_counts(table.column("image_id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(f"{spec!r}: image_id {repeated[0]['values'].as_py()!r} names "
                         f"{repeated[0]['counts'].as_py()} different inputs (and {len(repeated) - 1} more ids repeat); "
                         f"make the id column unique or drop it to use the uri rule")
    errors = table.num_rows - table.column("error_stage").null_count
    log.info("%s input %r: listed %d inputs (%d already errors); %s", name, spec, table.num_rows, errors,
             skipped_summary(table))
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


def _as_spec(spec: str | os.PathLike) -> str:
    """A spec as the listings take it: a ``file://`` URI becomes its local path (listed with every
    local safeguard: links, loops, FIFOs); a path or another URI stays as given."""
    text = os.fspath(spec)
    return local_path(text) or text


def _read_manifest(manifest: str, name: str) -> dict[str, list]:
    """A manifest's columns as Python lists (``name``: its file name); CSV cells stay text so ids
    like ``007`` keep their zeros. A manifest on a store is read in one request."""
    extension = os.path.splitext(name)[1].lower()
    if extension not in (".csv", ".tsv", ".parquet"):
        raise ValueError(f"manifest {_shown(manifest)!r} must be a .csv, .tsv or .parquet file")
    source = manifest
    if is_uri(manifest):
        filesystem, path, _ = _store_target(manifest)
        with filesystem.open_input_stream(path) as stream:
            source = io.BytesIO(stream.read())
    if extension == ".parquet":
        return pq.read_table(source).to_pydict()
    frame = pd.read_csv(source, dtype=str, keep_default_na=False, sep="\t" if extension == ".tsv" else ",")
    return {name: frame[name].tolist() for name in frame.columns}


def _manifest_location(uri: str, base: str, stores: dict[str, str | None]) -> str:
    """A manifest uri as the location the reader opens: a local path (absolute; a relative one
    resolves against ``base``, the manifest's folder: a path, or a URI on the manifest's store), or
    a store uri as written. Raises InputError ``invalid_uri`` for a store that pyarrow.fs cannot
    resolve (an unknown scheme), trying each store once (``stores``: store -> why not, or None)."""
    path = local_path(uri)
    if path is None:
        parts = urllib.parse.urlsplit(uri)
        store = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
        if store not in stores:
            try:
                resolve(store)
                stores[store] = None
            except (OSError, pa.ArrowException) as error:
                stores[store] = str(error).strip().splitlines()[0]
        if stores[store]:
            raise InputError("list", "invalid_uri", f"{uri!r}: {stores[store]}; a uri is a local path, file:// or a "
                             f"location pyarrow.fs reads (s3://, gs://, abfs://, hdfs://)")
        return uri
    if is_uri(base) and not os.path.isabs(os.path.expanduser(path)):
        return join(base, path)
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


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
