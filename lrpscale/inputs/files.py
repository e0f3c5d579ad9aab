"""The files of an input: opened only when they are regular files (never a FIFO or a device), and
found by walking a folder (links, loops, skipped names) or by matching a glob or brace pattern; on
a store (object storage, HDFS) the same, through one ``pyarrow.fs`` code path for every scheme."""
from __future__ import annotations

import errno
import fnmatch
import glob
import io
import os
import re
import stat
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lrpscale.inputs.errors import InputError
from lrpscale.inputs.names import _extension, _is_text, _shown
from lrpscale.inputs.skipped import _Skipped
from lrpscale.locations import is_uri, join, missing_error, resolve, split, storage_error

# Bytes a store file is read ahead by: a tar index reads every member header, and a batch reads
# neighbouring members, so one ranged request serves many of them instead of one request each
STORE_READ_AHEAD = 1 << 20

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
    """``open(path, "rb")`` after ``_check_regular``, or a store URI opened for ranged reads (read
    ahead by STORE_READ_AHEAD); raises InputError. A FIFO put in place between the check and the
    open could still block; nothing in a listing's lifetime does that."""
    if is_uri(path):
        return io.BufferedReader(_open_store_file(path, stage, what), STORE_READ_AHEAD)
    _check_regular(path, stage, what)
    try:
        return open(path, "rb")
    except OSError as error:
        raise InputError(stage, "unreadable", f"cannot open {what} {_shown(path)}: {error.strerror}") from None


def _open_parquet(path: str | bytes, stage: str) -> pq.ParquetFile:
    """A Parquet file, checked to be a regular file first; raises InputError or pyarrow's errors.
    On a store it reads the footer and then only the row groups asked for (ranged reads)."""
    if is_uri(path):
        return pq.ParquetFile(_open_store_file(path, stage, "parquet file"))
    _check_regular(path, stage, "parquet file")
    # pyarrow takes a path as UTF-8 text, so a name in other bytes goes in as an open file
    return pq.ParquetFile(path if isinstance(path, str) and _is_text(path) else open(path, "rb"))


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
    """What a symbolic link in a walk gives: a file, a folder to enter, or an error row (see
    ``lrpscale.inputs.sources``' docstring); the link's own name decides what is hidden or skipped."""
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


# ---------------------------------------------------------------------------------------------
# Files on a store (object storage, HDFS): one pyarrow.fs code path for every scheme. A store has no
# links, FIFOs or undecodable names; its paths in rows are URIs (``locations.join``)

_STORES: list[pafs.FileSystem] = []  # the filesystems this process opened store files with


def _store_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a store URI, reusing a filesystem this process already made with
    equal options (pyarrow compares endpoint, region and the kind of credentials, which are read
    once): a reader opens many files of one store, and a filesystem per file would open new
    connections for each."""
    filesystem, path = resolve(uri)
    known = next((store for store in _STORES if store.equals(filesystem)), None)
    if known is None:
        _STORES.append(filesystem)
    return known or filesystem, path


def _open_store_file(uri: str, stage: str, what: str) -> pa.NativeFile:
    """A file on a store opened for ranged reads; raises InputError (``missing``; ``unreadable``
    when the store refuses or fails, with what to do)."""
    try:
        filesystem, path = _store_filesystem(uri)
        return filesystem.open_input_file(path)
    except FileNotFoundError:
        raise InputError(stage, "missing", f"no {what} at {uri}; fix the location or remove the input") from None
    except (OSError, pa.ArrowException) as error:
        raise InputError(stage, "unreadable", f"{what}: {storage_error(uri, error)}") from None


def _store_target(location: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """(filesystem, path, what is there) for a store location named as input; raises ValueError
    naming the location and what to do when the store cannot be reached, refuses the credentials,
    has no such bucket, or holds nothing at that path."""
    try:
        filesystem, path = resolve(location)
        info = filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as error:
        raise storage_error(location, error) from None
    if info.type == pafs.FileType.NotFound:
        raise missing_error(location, filesystem, path)
    return filesystem, path, info


def _store_tree(location: str, filesystem: pafs.FileSystem, root: str) -> list[tuple[str, pafs.FileInfo]]:
    """Everything under the store folder ``root`` (``location`` names it in errors) as (path
    relative to it, FileInfo), from one recursive listing: the store pages it, so a prefix of a
    million objects costs about a thousand LIST requests, not a request per object."""
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException) as error:
        raise storage_error(location, error) from None
    prefix = root.rstrip("/") + "/"
    return [(entry.path[len(prefix):], entry) for entry in entries]


def _store_walk(location: str, extensions: Sequence[str], skipped: _Skipped | None = None) -> list[_Found]:
    """The non-hidden files under the store folder ``location`` with one of ``extensions``, each
    with its URI as the path to open, in no particular order; ``skipped`` counts what is left out
    as ``_walk`` counts it (a hidden folder once, not what it holds). Raises ValueError as
    ``_store_target`` does, NotADirectoryError for a file."""
    skipped = skipped or _Skipped(("", ""))
    filesystem, root, info = _store_target(location)
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{location} is a file, not a folder; pass the folder that holds the inputs")
    found, hidden = [], set()
    for relative, entry in _store_tree(location, filesystem, root):
        parts = relative.split("/")
        dot = next((index for index, part in enumerate(parts) if part.startswith(".")), None)
        if dot is not None:
            hidden.add("/".join(parts[:dot + 1]))
        elif entry.type != pafs.FileType.File:
            continue  # a folder: the recursive listing already holds what is in it
        elif _extension(parts[-1]) not in extensions:
            skipped.other_extension(parts[-1])
        else:
            found.append(_Found(relative, join(location, relative), None))
    for _ in hidden:
        skipped.add("hidden")
    return found


def _store_extensions(location: str) -> Iterator[str]:
    """The extensions of the non-hidden files under a store folder, a folder at a time in name
    order (one listing each): detection stops at the first image, so it lists a few folders, not
    a prefix of a million objects as ``_store_walk`` must."""
    filesystem, root, _ = _store_target(location)
    pending = [root]
    while pending:
        try:
            entries = filesystem.get_file_info(pafs.FileSelector(pending.pop(0)))
        except (OSError, pa.ArrowException) as error:
            raise storage_error(location, error) from None
        for entry in sorted(entries, key=lambda entry: entry.path):
            if entry.base_name.startswith("."):
                continue
            if entry.type == pafs.FileType.Directory:
                pending.append(entry.path)
            elif entry.type == pafs.FileType.File:
                yield _extension(entry.base_name)


def _glob_match(name: str, pattern: str) -> bool:
    """Whether a "/"-separated name matches a glob pattern as ``glob.glob`` matches files: part by
    part (a ``*`` never crosses a "/"), a hidden part only by a pattern part that starts with a dot."""
    names, parts = name.split("/"), pattern.split("/")
    return len(names) == len(parts) and all(fnmatch.fnmatchcase(got, want) and (want.startswith(".") or not got.startswith("."))
                                            for got, want in zip(names, parts))


def _store_match(pattern: str) -> tuple[str, list[_Found]]:
    """(root, files sorted) for a store URI whose path holds a glob or brace pattern: one recursive
    listing of the folder before the first wildcard, matched against each brace expansion with
    ``_glob_match``; a brace-named file that is absent is an error, as on local disk. In a URI a
    "?" starts the query, so only ``*``, ``[...]`` and braces are wildcards."""
    parts = urllib.parse.urlsplit(pattern)
    folder = re.split(r"[*\[{]", parts.path, maxsplit=1)[0].rpartition("/")[0]
    root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, folder, parts.query, ""))
    filesystem, path, _ = _store_target(root)
    files = {relative for relative, entry in _store_tree(root, filesystem, path) if entry.type == pafs.FileType.File}
    matched = set()
    for expanded in _expand_braces(parts.path[len(folder) + 1:]):
        wanted = urllib.parse.unquote(expanded)
        if _is_pattern(wanted):
            matched.update(name for name in files if _glob_match(name, wanted))
        elif wanted in files:
            matched.add(wanted)
        else:
            raise FileNotFoundError(f"{join(root, wanted)!r} (from {pattern!r}) does not exist; fix the pattern")
    return root, [_Found(name, join(root, name), None) for name in sorted(matched)]


def _is_store_pattern(spec: str) -> bool:
    """Whether a store URI's path holds a glob or brace pattern (its query is not part of it)."""
    return _is_pattern(urllib.parse.urlsplit(spec).path)


# ---------------------------------------------------------------------------------------------
# The files a spec names: a file, a folder (walked) or a glob/brace pattern


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
    folder input) or a pattern of ``suffix`` files; entries the walk cannot list carry an error.
    A store URI is listed on its store (``_store_match``, ``_store_walk``); raises ValueError for a
    store location that cannot be read."""
    if is_uri(spec):
        if _is_store_pattern(spec):
            root, found = _store_match(spec)
        elif _store_target(spec)[2].type == pafs.FileType.Directory:
            root, found = spec, sorted(_store_walk(spec, (suffix[1:],), skipped), key=lambda item: item.relative)
        else:
            root, name = split(spec)
            found = [_Found(name, spec, None)]
    elif os.path.isdir(spec):
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
