"""The run store: the one module that knows a run's layout and does every read and write of it.

A run is one location on any ``pyarrow.fs`` filesystem (a local folder today, object storage
next). Its layout::

    run.json                  configuration, model, counts, timings, status
    _listing.parquet          every input, frozen on the first start and cut into shards
    _commits/part-NNNNN-<attempt>.json  one marker per committed shard, naming its attempt's files
    <table>/part-NNNNN-<attempt>.parquet  one file per shard attempt in each table (images, neurons, ...)
    classes/                  the reducer's output
    compare-<run>/            comparisons written into this run
    evaluation/<settings id>/ faithfulness and randomisation checks (``lrpscale evaluate``)
    report.html               the HTML report

Exactly once rests on the markers: the actors write a shard's table files under a name unique to
their attempt, and the driver then writes the shard's marker, which names that attempt; readers
read only the files a marker names, so a killed or retried attempt's files are never seen, and
the next start (and the end of a run) deletes them. Every file is written to a hidden temporary name first and
then renamed, so a crash leaves the old file or the new one, never half of one. lrpscale deletes
only what this module lists as the run's own (``owned``): a user's file in the folder stays.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lrpscale.locations import environment_hint, resolve, storage_error
from lrpscale.storage.tables import TABLES

RUN_JSON = "run.json"
LISTING = "_listing.parquet"
COMMITS = "_commits"
CLASSES = "classes"
REPORT = "report.html"
COMPARE_PREFIX = "compare-"
EVALUATION = "evaluation"


# a commit marker's name: the shard and, since attempts are named, the attempt whose files it commits
_MARKER = re.compile(r"part-(\d+)(?:-([0-9a-f]+))?\.json")


# Object stores have no folders to create: a key's "folder" exists once a key below it does, and
# creating one costs a marker object and a bucket-wide permission (S3 checks HeadBucket as ListBucket)
_FLAT_STORES = ("s3", "gcs")


def new_attempt() -> str:
    """A fresh attempt id: 12 hex digits, unique per write of a shard (a retried or resumed shard
    writes new files beside any that a killed attempt left)."""
    return uuid.uuid4().hex[:12]


def safe_name(name) -> str:
    """A class name or layer as a file name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


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
        try:
            if not isinstance(self.fs, pafs.LocalFileSystem):
                self._check_store()
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
        except OSError as error:  # a store that refused a request: wrong credentials, no network
            raise storage_error(self.location, error) from None

    def _check_store(self) -> None:
        """On object storage: the bucket exists and one object can be written and deleted there
        (one PUT and one DELETE), so wrong credentials fail now, not in every actor."""
        bucket = self.root.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ValueError(f"--output {self.location}: the bucket {bucket!r} does not exist; create it, or check "
                             f"the name and that the environment points at the store that holds it "
                             f"({environment_hint(self.location)})")
        probe = self.path(f".lrpscale-write-check-{new_attempt()}")
        with self.fs.open_output_stream(probe) as stream:
            stream.write(b"lrpscale checks that it may write here")
        self.fs.delete_file(probe)

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
        if self.fs.type_name not in _FLAT_STORES:
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

    @classmethod
    def shard_file(cls, table: str, shard: int, attempt: str | None) -> str:
        """A shard's file of one table, relative to the run: ``<table>/part-NNNNN-<attempt>.parquet``
        (``part-NNNNN.parquet`` for runs written before attempts were named)."""
        return f"{table}/{cls.shard_name(shard)}{'-' + attempt if attempt else ''}.parquet"

    def commits(self) -> dict[int, str | None]:
        """{shard: the attempt whose files make it up} for every committed shard, from the marker
        names alone (one listing, no reads): ``_commits/part-NNNNN-<attempt>.json``, or
        ``part-NNNNN.json`` for a run written before attempts were named (attempt None)."""
        found = {}
        for entry in self.entries(COMMITS):
            if match := _MARKER.fullmatch(entry.base_name):
                found[int(match.group(1))] = match.group(2)
        return found

    def committed(self) -> set[int]:
        """The shards whose commit marker exists."""
        return set(self.commits())

    def committed_files(self, table: str) -> list[str]:
        """The Parquet files of a table that committed shards name (files of a crashed, killed or
        retried attempt are not among them), sorted: two listings, whatever the run's size."""
        names = {self.shard_file(table, shard, attempt).rpartition("/")[2] for shard, attempt in self.commits().items()}
        return sorted(entry.path for entry in self.entries(table) if entry.base_name in names)

    def committed_rows(self, table: str) -> int:
        return sum(self.parquet_file(path).metadata.num_rows for path in self.committed_files(table))

    def discard_uncommitted(self) -> int:
        """Remove every table file that no commit marker names (what a crashed driver, a killed
        actor or a retried attempt left behind) and the temporary files of interrupted writes;
        returns how many files went. Only lrpscale's own table folders are looked into."""
        removed = 0
        for table in TABLES:
            keep = set(self.committed_files(table))
            for entry in self.entries(table):
                if entry.type == pafs.FileType.File and entry.path not in keep:
                    self.fs.delete_file(entry.path)
                    removed += 1
        return removed

    def write_shard(self, shard: int, attempt: str, tables: dict[str, pa.Table]) -> dict[str, str]:
        """Write one attempt's file of a shard in every table (each atomically); returns {table:
        file relative to the run}. Readers ignore the files until ``mark_committed`` names them."""
        files = {}
        for table_name, table in tables.items():
            files[table_name] = self.shard_file(table_name, shard, attempt)
            self.write_parquet(files[table_name], table, compression="zstd")
        return files

    def mark_committed(self, shard: int, attempt: str, files: dict[str, str], rows: int, nodes: list[str] = ()) -> None:
        """Write a shard's commit marker: from then on the attempt's ``files`` are the shard. The
        marker's name carries the attempt (readers need no read of it); its content names the
        files, the rows and the Ray nodes whose actors analysed it."""
        marker = {"shard": shard, "attempt": attempt, "rows": rows, "files": files, "time": time.time(),
                  "nodes": sorted(nodes)}
        self.write_bytes(f"{COMMITS}/{self.shard_name(shard)}-{attempt}.json", json.dumps(marker).encode())

    def commit(self, shard: int, tables: dict[str, pa.Table], rows: int, nodes: list[str] = ()) -> None:
        """Write a shard's files and then its marker in one go (a fresh attempt id): what a writer
        that holds the whole shard does (synthetic runs, tests)."""
        attempt = new_attempt()
        self.mark_committed(shard, attempt, self.write_shard(shard, attempt, tables), rows, nodes)

    # --- derived outputs ------------------------------------------------------------------------

    def classes_path(self, name: str = "") -> str:
        return self.path(CLASSES, name) if name else self.path(CLASSES)

    def local_path(self) -> Path | None:
        """The run's folder as a local Path, or None on a remote filesystem."""
        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None
