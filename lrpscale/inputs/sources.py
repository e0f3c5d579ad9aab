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
  ``skipped_summary(table)`` as that line, for a driver to print.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import stat
import tarfile
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

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
    ("path", pa.string()),     # the image file, Parquet file or tar shard (see path_column)
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
    "no_image_column": "a Parquet file without an image-bytes column, where other files of the input have one",
    "missing": "the file, Parquet row or tar shard is not there, or the target of a symbolic link or tar hard link",
    "empty": "zero bytes (or null bytes in a Parquet image column)",
    "unreadable": "the file exists but cannot be opened or read (permissions, a directory, a corrupt container)",
    "truncated": "the data ends early: a tar shard or member cut short, or an image file cut off",
    "not_an_image": "bytes PIL cannot identify as any image format",
    "corrupt": "a recognised image format whose data PIL cannot decode",
    "decompression_bomb": "width x height above max_pixels",
    "unconvertible": "decoded, but conversion to the model input failed",
    "outside_root": "a symbolic link to something outside the input folder (followed only with follow_external_links=True)",
    "link_loop": "a folder that leads back into a folder it is inside of, or a chain of symbolic links without an end",
    "not_a_file": "a FIFO, socket or device where a file was expected; never opened, since reading one can block forever",
    "symlink_member": "a symbolic link inside a tar shard; never followed, since it could point anywhere on the reading machine",
}

# Why a listing left an entry out (not an error: nothing was meant to be read there)
SKIP_REASONS = {
    "hidden": "hidden entries (names starting with a dot)",
    "other_extension": "files whose extension is not one the listing reads",
    "no_sample_key": "tar members without a sample key (no extension)",
    "name_collision": "entries whose percent-encoded name equals another entry's name",
}
SKIPPED_METADATA = b"lrpscale.skipped"  # the listing table's schema metadata key for the skip counts
ENCODED_PATH_PREFIX = "fs-bytes:"  # a path column value holding the percent-encoded bytes of a path


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
# Names in any bytes: the OS hands Python undecodable bytes of a name as lone surrogates
# (U+DC80..U+DCFF, "surrogateescape"), which Arrow cannot store as UTF-8 text.


def _is_text(name: str) -> bool:
    """Whether ``name`` is valid text (no byte of the OS name was undecodable)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_name(name: str) -> str:
    """One file, folder or tar member name as the OS gave it -> valid text for ids and uris.

    A valid UTF-8 name comes back unchanged. Otherwise each undecodable byte becomes ``%XX``, and
    so does each ``%`` of that name, so ``urllib.parse.unquote_to_bytes`` gives back its bytes.
    """
    if _is_text(name):
        return name
    return "".join(f"%{ord(char) - 0xDC00:02X}" if "\udc80" <= char <= "\udcff" else "%25" if char == "%" else char
                   for char in name)


def text_path(path: str) -> str:
    """A "/"-separated path (absolute or relative) as valid text: ``text_name`` of each part."""
    if _is_text(path):
        return path
    return "/".join(text_name(part) for part in path.split("/"))


def path_column(path: str) -> str:
    """The ``path`` column value of an OS path: the path itself if it is valid text, else
    ``ENCODED_PATH_PREFIX`` + its bytes percent-encoded (no absolute path starts with that prefix)."""
    if _is_text(path):
        return path
    return ENCODED_PATH_PREFIX + urllib.parse.quote_from_bytes(os.fsencode(path), safe="/")


def os_path(column: str) -> str | bytes:
    """A ``path`` column value -> the name to open: the text itself, or the bytes it encodes."""
    if column.startswith(ENCODED_PATH_PREFIX):
        return urllib.parse.unquote_to_bytes(column[len(ENCODED_PATH_PREFIX):])
    return column


def _shown(path: str | bytes) -> str:
    """A path as messages show it: valid text, undecodable bytes percent-encoded."""
    return text_path(os.fsdecode(path))


# ---------------------------------------------------------------------------------------------
# Opening files without ever opening a FIFO or a device


def _file_kind(mode: int) -> str:
    """What a stat mode that is neither a regular file nor a directory is, in words."""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_a_file(stage: str, what: str, path: str | bytes, mode: int) -> InputError:
    """The ``not_a_file`` error for ``path`` (``what`` names it in the message: "tar shard", or "")."""
    return InputError(stage, "not_a_file", f"{what + ' ' if what else ''}{_shown(path)} is {_file_kind(mode)}, not a "
                      f"regular file; it is never opened (reading one can block forever); replace it with the file "
                      f"itself or remove it")


def _check_regular(path: str | bytes, stage: str, what: str) -> None:
    """Check, without opening anything, that ``path`` is a regular file; raises InputError
    (``missing``, ``unreadable`` for a directory or a stat failure, ``not_a_file``). ``what`` names
    the file in messages ("image file", "tar shard")."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise InputError(stage, "missing", f"no {what} at {_shown(path)}; fix the path or remove the input") from None
    except OSError as error:
        raise InputError(stage, "unreadable", f"cannot open {what} {_shown(path)}: {error.strerror}") from None
    if stat.S_ISDIR(status.st_mode):
        raise InputError(stage, "unreadable", f"{what} {_shown(path)} is a directory, not a file")
    if not stat.S_ISREG(status.st_mode):
        raise _not_a_file(stage, what, path, status.st_mode)


def _open_regular(path: str | bytes, stage: str, what: str) -> BinaryIO:
    """``open(path, "rb")`` after ``_check_regular``; raises InputError. A FIFO put in place between
    the check and the open could still block; nothing in a listing's lifetime does that."""
    _check_regular(path, stage, what)
    try:
        return open(path, "rb")
    except OSError as error:
        raise InputError(stage, "unreadable", f"cannot open {what} {_shown(path)}: {error.strerror}") from None


def _open_parquet(path: str | bytes, stage: str) -> pq.ParquetFile:
    """A Parquet file, checked to be a regular file first; raises InputError or pyarrow's errors."""
    _check_regular(path, stage, "parquet file")
    # pyarrow takes a path as UTF-8 text, so a name in other bytes goes in as an open file
    return pq.ParquetFile(path if isinstance(path, str) and _is_text(path) else open(path, "rb"))


# ---------------------------------------------------------------------------------------------
# Listing


class _Skipped:
    """What one listing left out on purpose: counts per SKIP_REASONS key, and the extensions of the
    files with other extensions."""

    def __init__(self, wanted: tuple[str, str]):
        self.wanted = wanted  # what the listing reads, one and many: ("an image", "images")
        self.counts: Counter[str] = Counter()
        self.extensions: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def other_extension(self, name: str) -> None:
        self.counts["other_extension"] += 1
        self.extensions["." + _extension(name) if "." in name else "(none)"] += 1

    def metadata(self) -> bytes:
        """The counts as JSON for the listing's schema metadata (read back by ``skipped_entries``)."""
        counts = {reason: self.counts[reason] for reason in SKIP_REASONS if self.counts[reason]}
        # the most frequent extensions first, ties by name, so the summary line is the same every time
        extensions = dict(sorted(self.extensions.items(), key=lambda item: (-item[1], item[0])))
        return json.dumps({"counts": counts, "extensions": extensions, "wanted": self.wanted}).encode()


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
    for links, special files and names that are not UTF-8)."""
    root = os.path.abspath(spec)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"folder input {spec!r} is not a directory; pass a directory of images "
                                 f"or choose another kind with --input-kind ({', '.join(SOURCES)})")
    listing = _Listing("folder", ("an image", "images"))
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

    A row with an empty or non-local uri becomes a ``list`` error row. A row with an empty id
    cell falls back to the uri rule. ``follow_external_links`` is accepted for a uniform
    ``list_inputs`` and has no effect: a manifest names its files, links included, on purpose.
    """
    manifest = os.path.abspath(spec)
    shown = _shown(manifest)
    columns = _read_manifest(manifest)
    if uri_column not in columns:
        raise ValueError(f"manifest {shown!r} has no {uri_column!r} column (it has {list(columns)}); "
                         f"rename its uri column to {uri_column!r}, or name it with uri_column= in the Python API")
    id_column = id_column or next((name for name in ID_COLUMNS if name in columns), None)
    uris = [_as_text(value) for value in columns[uri_column]]
    labels = [_as_text(value) for value in columns[label_column]] if label_column in columns else [None] * len(uris)
    ids = [_as_text(value) for value in columns[id_column]] if id_column else [None] * len(uris)
    base = os.path.dirname(manifest)
    listing = _Listing("manifest", ("an image", "images"))
    seen: set[str] = set()  # resolved paths, and the uris that could not be resolved
    for number, (uri, label, given_id) in enumerate(zip(uris, labels, ids)):
        if uri is None:
            listing.add_error(given_id or f"{text_name(os.path.basename(manifest))}#{number}", f"{shown}#{number}", label,
                              "invalid_uri", f"row {number} of manifest {shown} has an empty {uri_column!r}; "
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
    _, found = _data_files(spec, ".parquet", listing.skipped, follow_external_links)
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
    _, found = _data_files(spec, ".tar", listing.skipped, follow_external_links)
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
    has a ``uri`` column; ``.tar`` files and patterns of them are ``webdataset``."""
    choose = f"choose one with --input-kind on the command line (kind= in the Python API): {', '.join(SOURCES)}"
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
        # links to elsewhere count here: detection reads names only, the listing decides what to follow
        for item in _walk(os.path.abspath(spec), IMAGE_EXTENSIONS + ("parquet", "tar"), follow_external_links=True):
            extension = _extension(item.relative)
            if item.error is None and extension in IMAGE_EXTENSIONS:
                return "folder"
            found.add(extension if item.error is None else "")
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
        raise ValueError(f"cannot tell what kind of input {spec!r} is; {choose}")
    if os.path.exists(spec):
        raise ValueError(f"input {spec!r} is {_file_kind(os.stat(spec).st_mode)}, not a file or directory; "
                         f"pass a directory, a manifest, Parquet files or tar shards")
    raise FileNotFoundError(f"input {spec!r} does not exist; pass a directory, a manifest, Parquet files or tar shards")


def list_inputs(spec: str | os.PathLike, kind: str | None = None, **options) -> pa.Table:
    """List a dataset: one row per input, schema LISTING_SCHEMA, in a deterministic order.

    spec: a path or pattern (see the module docstring); kind: a SOURCES key, detected if None;
    options: passed to the source's list function (e.g. ``image_column=`` for parquet,
    ``uri_column=`` for manifests, ``follow_external_links=True`` for folders, Parquet and tar
    directories). Rows the listing already knows are bad carry ``error_stage="list"``. The
    table's schema metadata carries what was skipped (``skipped_entries``), also logged at INFO.
    Raises if the spec names nothing, holds no inputs, or gives two different inputs the same
    image_id.
    """
    spec = os.fspath(spec)
    name = kind or detect_kind(spec)
    table = get_source(name).list(spec, **options)
    if table.num_rows == 0:
        raise ValueError(f"no inputs found in {spec!r} (kind {name}; {skipped_summary(table)})")
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


def skipped_entries(table: pa.Table) -> dict[str, int]:
    """What a listing skipped: SKIP_REASONS key -> count (only reasons that occurred); {} for a
    table without the listing's metadata."""
    return dict(_skipped_metadata(table).get("counts", {}))


def skipped_summary(table: pa.Table) -> str:
    """The skip counts of a listing as one line: "skipped 3 hidden entries, 2 files that are not
    images (.txt, .json)", or "skipped nothing"."""
    skipped = _skipped_metadata(table)
    one, many = skipped.get("wanted", ("an input", "inputs"))
    parts = []
    for reason, count in skipped.get("counts", {}).items():
        phrase = _SKIP_PHRASES.get(reason, (reason, reason))[count != 1].format(one=one, many=many)
        if reason == "other_extension":
            extensions = list(skipped.get("extensions", {}))
            phrase += f" ({', '.join(extensions[:8])}{f', and {len(extensions) - 8} more' if len(extensions) > 8 else ''})"
        parts.append(f"{count} {phrase}")
    return "skipped " + ", ".join(parts) if parts else "skipped nothing"


# The summary line's words per SKIP_REASONS key, for one and for many; {one}/{many}: what the listing reads
_SKIP_PHRASES = {
    "hidden": ("hidden entry", "hidden entries"),
    "other_extension": ("file that is not {one}", "files that are not {many}"),
    "no_sample_key": ("tar member without a sample key", "tar members without a sample key"),
    "name_collision": ("entry whose percent-encoded name is another entry's", "entries whose percent-encoded name is another entry's"),
}


def _skipped_metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(SKIPPED_METADATA, b"{}"))


# ---------------------------------------------------------------------------------------------
# Walking a folder


class _Found(NamedTuple):
    """One entry of a folder walk: a file to list, or why an entry cannot be listed."""

    relative: str               # below the root, "/"-separated, as the OS names it (see text_name)
    path: str                   # the path to open; links in it stay, opening follows them
    error: InputError | None    # set for an entry that becomes a "list" error row
    folder: bool = False        # the entry is (or leads to) a folder, not a file


def _walk(root: str, extensions: Sequence[str], skipped: _Skipped | None = None, *,
          follow_external_links: bool = False) -> Iterator[_Found]:
    """The non-hidden files under ``root`` with one of ``extensions``, and the entries that cannot be
    listed, in no particular order; ``skipped`` counts what is left out.

    Costs one ``stat`` per folder (for loop detection) and one per symbolic link (to learn what
    it points at); plain files cost none beyond the directory read. Raises OSError if ``root``
    itself cannot be read.
    """
    skipped = skipped or _Skipped(("", ""))
    real_root = os.path.realpath(root)
    top = os.stat(root)
    pending = [(root, "", frozenset({(top.st_dev, top.st_ino)}))]  # folders to read, with those they are inside
    while pending:
        folder, prefix, ancestors = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            if not prefix:
                raise OSError(error.errno, f"cannot read the input folder {_shown(root)}: {error.strerror}") from None
            yield _Found(prefix[:-1], folder, InputError("list", "unreadable", f"cannot read folder {_shown(folder)}: "
                                                         f"{error.strerror}"), folder=True)
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.name.startswith("."):
                skipped.add("hidden")
            elif entry.is_symlink():
                yield from _follow_link(entry, relative, extensions, skipped, real_root, ancestors, follow_external_links,
                                        pending)
            elif entry.is_dir(follow_symlinks=False):
                yield from _enter(entry.path, relative, entry.stat(follow_symlinks=False), ancestors, pending)
            elif _extension(entry.name) not in extensions:
                skipped.other_extension(entry.name)
            elif entry.is_file(follow_symlinks=False):
                yield _Found(relative, entry.path, None)
            else:
                yield _Found(relative, entry.path, _not_a_file("list", "", entry.path,
                                                               entry.stat(follow_symlinks=False).st_mode))


def _enter(path: str, relative: str, status: os.stat_result, ancestors: frozenset, pending: list) -> Iterator[_Found]:
    """Queue the folder at ``path`` for the walk, or yield one ``link_loop`` row if it is a folder
    the walk is already inside of (reading it again would never end)."""
    identity = (status.st_dev, status.st_ino)
    if identity in ancestors:
        yield _Found(relative, path, InputError(
            "list", "link_loop", f"{_shown(path)} leads back to {_shown(os.path.realpath(path))}, a folder it is inside "
            f"of; it is not entered (that would never end); remove the link or point it elsewhere"), folder=True)
    else:
        pending.append((path, relative + "/", ancestors | {identity}))


def _follow_link(entry: os.DirEntry, relative: str, extensions: Sequence[str], skipped: _Skipped, real_root: str,
                 ancestors: frozenset, follow_external_links: bool, pending: list) -> Iterator[_Found]:
    """What a symbolic link in a walk gives: a file, a folder to enter, or an error row (see the
    module docstring); the link's own name decides what is hidden or skipped."""
    shown = _shown(entry.path)
    extension = _extension(entry.name)
    try:
        status = os.stat(entry.path)
    except FileNotFoundError:
        if extension and extension not in extensions:
            skipped.other_extension(entry.name)
        else:  # it could have been an image or a folder of them
            yield _Found(relative, entry.path, InputError(
                "list", "missing", f"{shown} is a symbolic link to {_shown(os.readlink(entry.path))}, which does not "
                f"exist; restore the target or remove the link"), folder=not extension)
        return
    except OSError as error:
        error_type = "link_loop" if error.errno == errno.ELOOP else "unreadable"
        yield _Found(relative, entry.path, InputError("list", error_type, f"cannot follow symbolic link {shown}: "
                                                      f"{error.strerror}"))
        return
    is_folder = stat.S_ISDIR(status.st_mode)
    if not is_folder and extension not in extensions:
        skipped.other_extension(entry.name)
        return
    target = os.path.realpath(entry.path)
    if not follow_external_links and os.path.commonpath([real_root, target]) != real_root:
        yield _Found(relative, entry.path, InputError(
            "list", "outside_root", f"{shown} is a symbolic link to {_shown(target)}, outside the input folder "
            f"{_shown(real_root)}; it is not followed: copy or move the target into the folder, or list with "
            f"--follow-external-links (follow_external_links=True in the Python API)"),
            folder=is_folder)
    elif is_folder:
        yield from _enter(entry.path, relative, status, ancestors, pending)
    elif stat.S_ISREG(status.st_mode):
        yield _Found(relative, entry.path, None)
    else:
        yield _Found(relative, entry.path, _not_a_file("list", "the target of symbolic link", entry.path, status.st_mode))


def _extension(name: str) -> str:
    """The lower-case extension of a name without its dot, "" for none."""
    return name.rsplit(".", 1)[1].lower() if "." in name.rsplit("/", 1)[-1] else ""


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
# Reading tar shards' indexes


class _Member(NamedTuple):
    """A tar member as a sample part: where its data is (a hard link: its target's), or why it is unusable."""

    name: str                   # as stored (see text_name)
    offset: int
    size: int
    problem: InputError | None


class _Sample(NamedTuple):
    image: _Member | None
    label: str | None
    extensions: list[str]
    problem: InputError | None


def _shard_samples(path: str, shown: str, skipped: _Skipped) -> dict[str, _Sample]:
    """key -> sample for one shard, in order; raises InputError when no sample can be read at all."""
    with _open_regular(path, "list", "tar shard") as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            infos, ending = _tar_index(handle, shown, size)
            grouped, last_key = _group_members(_tar_members(infos, shown, size), skipped)
            if not grouped and ending:
                raise ending
            samples = {}
            for key, members in grouped.items():
                problem = next((member.problem for member in members.values() if member.problem), None)
                if problem is None and key == last_key:
                    problem = ending
                label_member = next((members[ext] for ext in LABEL_EXTENSIONS if ext in members), None)
                label = _read_label(handle, label_member) if label_member and not label_member.problem else None
                image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                samples[key] = _Sample(image, label, list(members), problem)
        except (OSError, tarfile.TarError) as error:
            raise InputError("list", "unreadable", f"cannot read tar shard {shown}: {error}") from None
    return samples


def _tar_index(handle: BinaryIO, shown: str, size: int) -> tuple[list[tarfile.TarInfo], InputError | None]:
    """The members of a tar file in order, and the problem with its end (None when it ends with
    tar's end-of-archive marker); raises InputError when it is not a tar at all."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.ReadError:
        raise _not_a_tar(handle, shown, size) from None
    infos = []
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError:
            break  # the data of the member just read runs past the end; _tar_members reports that member
        if info is None:
            break
        infos.append(info)
    return infos, _tar_ending(handle, tar.offset, size, shown, infos[-1].name if infos else None)


def _tar_ending(handle: BinaryIO, offset: int, size: int, shown: str, last: str | None) -> InputError | None:
    """Whether the tar file continues with an end-of-archive block (512 zero bytes) at ``offset``,
    where tarfile stopped: None if so, else the ``truncated`` or ``unreadable`` problem."""
    handle.seek(offset)
    if handle.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE):
        return None
    after = f" after member {text_path(last)}" if last else ""
    if offset + tarfile.BLOCKSIZE > size:
        return InputError("list", "truncated", f"tar shard {shown} ends at byte {size}{after} without tar's "
                          f"end-of-archive marker: it was cut short (an interrupted copy?), so this sample may miss "
                          f"members and later samples are lost; copy the shard again")
    return InputError("list", "unreadable", f"tar shard {shown} has a damaged member header at byte {offset}{after}; "
                      f"the members after it cannot be read; write the shard again")


# The first bytes of compressed files someone may pass as shards; tar members are read by seeking,
# which needs an uncompressed tar
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"PK\x03\x04", "zip", "unzip"))


def _not_a_tar(handle: BinaryIO, shown: str, size: int) -> InputError:
    """The ``list`` error for a shard tarfile cannot open: empty, compressed, or not a tar."""
    if size == 0:
        return InputError("list", "empty", f"tar shard {shown} is a zero-byte file")
    handle.seek(0)
    head = handle.read(8)
    kind = next(((name, tool) for magic, name, tool in _COMPRESSED if head.startswith(magic)), None)
    if kind:
        return InputError("list", "unreadable", f"tar shard {shown} is {kind[0]}-compressed; WebDataset shards are read "
                          f"as uncompressed tar files (members are read by seeking): decompress it ({kind[1]})")
    if size < tarfile.BLOCKSIZE:
        return InputError("list", "unreadable", f"tar shard {shown} is {size} bytes, shorter than one tar header "
                          f"({tarfile.BLOCKSIZE} bytes): it is not a tar file, or one cut short inside its first header")
    return InputError("list", "unreadable", f"tar shard {shown} ({size} bytes) is not a tar file: it does not start "
                      f"with a valid tar header; pass uncompressed tar shards, or choose another kind with --input-kind")


def _tar_members(infos: Iterable[tarfile.TarInfo], shown: str, size: int) -> Iterator[_Member]:
    """The members that can be sample parts (all but folders), each with where its data is or
    what is wrong with it; ``size`` is the shard's size in bytes."""
    regular: dict[str, tarfile.TarInfo] = {}  # earlier regular members by name, for hard links
    for info in infos:
        name = text_path(info.name)
        data, problem = info, None
        if info.isdir():
            continue
        if info.issym():
            problem = InputError("list", "symlink_member", f"member {name} of {shown} is a symbolic link (to "
                                 f"{text_path(info.linkname)}); links in shards are never followed (they could point "
                                 f"anywhere on the machine reading them); store the file itself in the shard")
        elif info.islnk():
            data = regular.get(info.linkname) or regular.get(info.linkname.removeprefix("./"))
            if data is None:
                problem = InputError("list", "missing", f"member {name} of {shown} is a hard link to "
                                     f"{text_path(info.linkname)}, which is not an earlier member of the shard; "
                                     f"store the file itself in the shard")
        elif info.issparse():
            problem = InputError("list", "unreadable", f"member {name} of {shown} is stored sparse, which cannot be read "
                                 f"by seeking; write the shard again without sparse files")
        elif info.isreg():
            regular[info.name] = regular[info.name.removeprefix("./")] = info
        else:
            problem = InputError("list", "not_a_file", f"member {name} of {shown} is a device or FIFO entry, not a file; "
                                 f"store the file itself in the shard")
        if problem is None and data.offset_data + data.size > size:
            present = max(0, size - data.offset_data)
            problem = InputError("list", "truncated", f"tar shard {shown} ends inside member {text_path(data.name)}: "
                                 f"{present} of its {data.size} bytes are there (the shard was cut short, e.g. by an "
                                 f"interrupted copy); copy the shard again")
        yield _Member(info.name, data.offset_data if problem is None else -1, data.size if problem is None else -1, problem)


def _group_members(members: Iterable[_Member], skipped: _Skipped) -> tuple[dict[str, dict[str, _Member]], str | None]:
    """key -> (extension -> member) in order of first appearance, and the key of the last member."""
    grouped: dict[str, dict[str, _Member]] = {}
    last = None
    for member in members:
        # WebDataset's rule: the key is the path up to the first dot of the file name; a file
        # name that starts with a dot (hidden, macOS "._" forks) has no key and is skipped
        match = re.match(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$", member.name)
        if match:
            last = match.group(1)
            grouped.setdefault(last, {})[match.group(2).lower()] = member
        else:
            skipped.add("hidden" if member.name.rsplit("/", 1)[-1].startswith(".") else "no_sample_key")
    return grouped, last


def _read_label(handle: BinaryIO, member: _Member) -> str | None:
    """The text of a label member, stripped; None when empty."""
    handle.seek(member.offset)
    return handle.read(member.size).decode("utf-8", errors="replace").strip() or None


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


def _read_manifest(manifest: str) -> dict[str, list]:
    """A manifest's columns as Python lists; CSV cells stay text so ids like ``007`` keep their zeros."""
    extension = os.path.splitext(manifest)[1].lower()
    if extension == ".parquet":
        return pq.read_table(manifest).to_pydict()
    if extension in (".csv", ".tsv"):
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, sep="\t" if extension == ".tsv" else ",")
        return {name: frame[name].tolist() for name in frame.columns}
    raise ValueError(f"manifest {_shown(manifest)!r} must be a .csv, .tsv or .parquet file")


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
    """The files a glob/brace pattern names, sorted; a brace-named file that is absent is an error.
    Folders are left out; FIFOs and dangling links stay, for the listing to report."""
    files = set()
    for expanded in _expand_braces(pattern):
        if not _is_pattern(expanded) and not os.path.lexists(expanded):
            raise FileNotFoundError(f"{expanded!r} (from {pattern!r}) does not exist; fix the pattern")
        files.update(os.path.abspath(file) for file in glob.glob(expanded) if not os.path.isdir(file))
    return sorted(files)


def _data_files(spec: str, suffix: str, skipped: _Skipped,
                follow_external_links: bool = False) -> tuple[str, list[_Found]]:
    """(root, files sorted by relative path) for a file, a directory (recursive, walked like a
    folder input) or a pattern of ``suffix`` files; entries the walk cannot list carry an error."""
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        found = sorted(_walk(root, (suffix[1:],), skipped, follow_external_links=follow_external_links),
                       key=lambda item: item.relative)
    elif os.path.isfile(spec):
        root = os.path.dirname(os.path.abspath(spec))
        found = [_Found(os.path.basename(spec), os.path.abspath(spec), None)]
    elif _is_pattern(spec):
        prefix = re.split(r"[*?\[{]", spec, maxsplit=1)[0]
        root = os.path.abspath(os.path.dirname(prefix) or ".")
        found = [_Found(_relative(file, root), file, None) for file in _match(spec)]
    elif os.path.exists(spec):
        raise ValueError(f"input {spec!r} is {_file_kind(os.stat(spec).st_mode)}, not a file or directory")
    else:
        raise FileNotFoundError(f"input {spec!r} does not exist")
    if not found:
        raise FileNotFoundError(f"no {suffix} files in {spec!r}")
    return root, found
