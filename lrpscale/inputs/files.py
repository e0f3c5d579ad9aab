"""The files of an input: opened only when they are regular files (never a FIFO or a device), and
found by walking a folder (links, loops, skipped names) or by matching a glob or brace pattern."""
from __future__ import annotations

import errno
import glob
import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

import pyarrow.parquet as pq

from lrpscale.inputs.errors import InputError
from lrpscale.inputs.names import _extension, _is_text, _shown
from lrpscale.inputs.skipped import _Skipped

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
