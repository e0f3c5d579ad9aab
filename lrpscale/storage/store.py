"""The run store: the one module that knows a run's layout and does every read and write of it.

A run is one location on any ``pyarrow.fs`` filesystem (a local folder today, object storage
next). Its layout::

    run.json                  configuration, model, counts, timings, status
    _listing.parquet          every input, frozen on the first start and cut into shards
    _commits/part-NNNNN.json  one marker per committed shard
    <table>/part-NNNNN.parquet  one file per shard in each table (images, neurons, ...)
    classes/                  the reducer's output
    compare-<run>/            comparisons written into this run
    evaluation/<settings id>/ faithfulness and randomisation checks (``lrpscale evaluate``)
    report.html               the HTML report

Exactly once rests on the markers: a shard's table files count only once its marker exists, and
readers read committed files only. Every file is written to a hidden temporary name first and
then renamed, so a crash leaves the old file or the new one, never half of one. lrpscale deletes
only what this module lists as the run's own (``owned``): a user's file in the folder stays.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lrpscale.storage.tables import TABLES

RUN_JSON = "run.json"
LISTING = "_listing.parquet"
COMMITS = "_commits"
CLASSES = "classes"
REPORT = "report.html"
COMPARE_PREFIX = "compare-"
EVALUATION = "evaluation"


def safe_name(name) -> str:
    """A class name or layer as a file name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A location (a local path or a URI such as ``file://``, ``s3://``) -> (filesystem, path in it).

    Local paths become absolute; every URI goes through ``pyarrow.fs.FileSystem.from_uri``, so
    credentials and endpoints come from each store's standard environment."""
    text = os.fspath(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


class RunStore:
    """One run's files. ``location`` is what the user gave (``--output``); ``root`` its path
    inside ``fs``."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.fs, self.root = resolve(location)

    def __repr__(self) -> str:
        return f"RunStore({self.location!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # --- what is there --------------------------------------------------------------------------

    def _info(self, *parts: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self._info(*parts).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self._info(*parts).type == pafs.FileType.File

    def is_dir(self, *parts: str) -> bool:
        return self._info(*parts).type == pafs.FileType.Directory

    def entries(self, *parts: str) -> list[pafs.FileInfo]:
        """The entries directly inside a folder of the run (none if it does not exist)."""
        if not self.is_dir(*parts):
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.path(*parts), recursive=False))

    def is_run(self) -> bool:
        """Whether the location holds a run (its listing or run.json), even one that never finished."""
        return self.is_file(RUN_JSON) or self.is_file(LISTING)

    def owned(self) -> list[pafs.FileInfo]:
        """The entries lrpscale wrote: tables, markers, listing, run.json, the reducer's
        classes/, comparisons, evaluations, the report and temporary files of interrupted writes."""
        names = {*TABLES, COMMITS, LISTING, RUN_JSON, CLASSES, REPORT, EVALUATION}
        return sorted((entry for entry in self.entries()
                       if entry.base_name in names or entry.base_name.startswith(COMPARE_PREFIX)
                       or (entry.base_name.startswith(".") and entry.base_name.endswith(".tmp"))),
                      key=lambda entry: entry.path)

    def check_location(self, input_spec: str) -> None:
        """Refuse a location that would mix the run with other files: a file, a folder inside the
        input (or the input itself), or a folder that holds other files and no run."""
        # a pattern's folder is what lies before its first wildcard; an input and an output on
        # different filesystems cannot hold one another (resolving an input URI may need the network)
        prefix = re.split(r"[*?\[{]", input_spec)[0] or "."
        source = resolve(prefix)[1] if ("://" in prefix) == ("://" in self.location) else None
        if source is not None and (self.root == source or self.root.startswith(source.rstrip("/") + "/")):
            raise ValueError(f"--output {self.location} lies inside --input {input_spec}: the run's files would "
                             "mix with the images; choose an output folder outside the input")
        if self.is_file():
            raise ValueError(f"--output {self.location} is a file, not a folder; choose a new or empty folder")
        if isinstance(self.fs, pafs.LocalFileSystem):
            existing = Path(self.root)
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise ValueError(f"--output {self.location}: cannot write to {existing} (permission denied); "
                                 "choose a folder you can write to")
        if not self.is_run() and self.entries():
            raise ValueError(f"--output {self.location} is not empty and holds no lrpscale run; lrpscale does not "
                             "write into a folder of other files: choose a new or empty folder")

    def remove(self) -> None:
        """Delete the run: only the entries ``owned`` lists, so a user's file in the folder stays."""
        for entry in self.owned():
            if entry.type == pafs.FileType.Directory:
                self.fs.delete_dir(entry.path)
            else:
                self.fs.delete_file(entry.path)

    # --- atomic writes --------------------------------------------------------------------------

    @contextmanager
    def open_atomic(self, relative: str) -> Iterator[pa.NativeFile]:
        """A stream to a hidden temporary file, renamed to ``relative`` when the block ends
        without an error (and removed when it raises)."""
        target = self.path(relative)
        folder, _, name = target.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as stream:
                yield stream
        except BaseException:
            self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, target)

    def write_bytes(self, relative: str, content: bytes) -> None:
        with self.open_atomic(relative) as stream:
            stream.write(content)

    def write_parquet(self, relative: str, table: pa.Table, **options) -> None:
        with self.open_atomic(relative) as stream:
            pq.write_table(table, stream, **options)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def read_parquet(self, relative: str, **options) -> pa.Table:
        return pq.read_table(self.path(relative), filesystem=self.fs, **options)

    def parquet_file(self, path: str, **options) -> pq.ParquetFile:
        """A Parquet file of the run by its full path (as ``committed_files`` gives)."""
        return pq.ParquetFile(self.fs.open_input_file(path), **options)

    # --- run.json and the listing ---------------------------------------------------------------

    def read_json(self) -> dict | None:
        return json.loads(self.read_bytes(RUN_JSON)) if self.is_file(RUN_JSON) else None

    def write_json(self, content: dict) -> None:
        self.write_bytes(RUN_JSON, json.dumps(content, indent=2, default=str).encode())

    def has_listing(self) -> bool:
        return self.is_file(LISTING)

    def read_listing(self) -> pa.Table:
        return self.read_parquet(LISTING)

    def write_listing(self, listing: pa.Table) -> None:
        self.write_parquet(LISTING, listing)

    # --- shards and commits ---------------------------------------------------------------------

    @staticmethod
    def shard_name(shard: int) -> str:
        return f"part-{shard:05d}"

    def committed(self) -> set[int]:
        """The shards whose commit marker exists."""
        return {int(match.group(1)) for entry in self.entries(COMMITS)
                if (match := re.fullmatch(r"part-(\d+)\.json", entry.base_name))}

    def committed_files(self, table: str) -> list[str]:
        """The Parquet files of a table whose shards are committed (a crashed shard's are not), sorted."""
        committed = {self.shard_name(shard) for shard in self.committed()}
        return sorted(entry.path for entry in self.entries(table)
                      if entry.base_name.endswith(".parquet") and entry.base_name[:-8] in committed)

    def committed_rows(self, table: str) -> int:
        return sum(self.parquet_file(path).metadata.num_rows for path in self.committed_files(table))

    def discard_uncommitted(self, shards: set[int]) -> None:
        """Remove the table files of shards without a commit marker (a crash between writes)."""
        for table in TABLES:
            names = {f"{self.shard_name(shard)}.parquet" for shard in shards}
            for entry in self.entries(table):
                if entry.base_name in names:
                    self.fs.delete_file(entry.path)

    def commit(self, shard: int, tables: dict[str, pa.Table], rows: int, nodes: list[str] = ()) -> None:
        """Write a shard's file in every table, then its marker (``nodes``: the Ray nodes whose
        actors analysed it). Until the marker exists no reader sees the files."""
        name = self.shard_name(shard)
        for table_name, table in tables.items():
            self.write_parquet(f"{table_name}/{name}.parquet", table, compression="zstd")
        marker = {"shard": shard, "rows": rows, "time": time.time(), "nodes": sorted(nodes)}
        self.write_bytes(f"{COMMITS}/{name}.json", json.dumps(marker).encode())

    # --- derived outputs ------------------------------------------------------------------------

    def classes_path(self, name: str = "") -> str:
        return self.path(CLASSES, name) if name else self.path(CLASSES)

    def local_path(self) -> Path | None:
        """The run's folder as a local Path, or None on a remote filesystem."""
        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None
