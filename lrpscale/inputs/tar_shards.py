"""Reading a WebDataset tar shard's index without reading its images: members grouped into samples
by key, where each image's bytes sit, labels, and what is wrong with a shard that is cut short,
compressed, or holds links or devices."""
from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from lrpscale.inputs.errors import InputError
from lrpscale.inputs.files import _open_regular
from lrpscale.inputs.names import IMAGE_EXTENSIONS, text_path
from lrpscale.inputs.skipped import _Skipped

LABEL_EXTENSIONS = ("cls", "label", "txt")  # WebDataset members that carry the label, first wins


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
            size = handle.seek(0, os.SEEK_END)  # a local file or a store's object alike
            handle.seek(0)
            infos, ending, labels = _tar_index(handle, shown, size)
            grouped, last_key = _group_members(_tar_members(infos, shown, size), skipped)
            if not grouped and ending:
                raise ending
            samples = {}
            for key, members in grouped.items():
                problem = next((member.problem for member in members.values() if member.problem), None)
                if problem is None and key == last_key:
                    problem = ending
                label_member = next((members[ext] for ext in LABEL_EXTENSIONS if ext in members), None)
                label = _read_label(handle, label_member, labels) if label_member and not label_member.problem else None
                image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                samples[key] = _Sample(image, label, list(members), problem)
        except (OSError, tarfile.TarError) as error:
            raise InputError("list", "unreadable", f"cannot read tar shard {shown}: {error}") from None
    return samples


def _tar_index(handle: BinaryIO, shown: str, size: int) -> tuple[list[tarfile.TarInfo], InputError | None, dict[int, bytes]]:
    """The members of a tar file in order, the problem with its end (None when it ends with tar's
    end-of-archive marker), and the data of its label members by data offset; raises InputError
    when it is not a tar at all.

    Labels are read as the pass goes by: seeking back for each one afterwards would cost a
    request per sample on a store."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.ReadError:
        raise _not_a_tar(handle, shown, size) from None
    infos, labels = [], {}
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError:
            break  # the data of the member just read runs past the end; _tar_members reports that member
        if info is None:
            break
        infos.append(info)
        part = _sample_part(info.name)
        if info.isreg() and part and part[1] in LABEL_EXTENSIONS:
            handle.seek(info.offset_data)
            labels[info.offset_data] = handle.read(info.size)
    return infos, _tar_ending(handle, tar.offset, size, shown, infos[-1].name if infos else None), labels


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
        part = _sample_part(member.name)
        if part:
            last = part[0]
            grouped.setdefault(last, {})[part[1]] = member
        else:
            skipped.add("hidden" if member.name.rsplit("/", 1)[-1].startswith(".") else "no_sample_key")
    return grouped, last


def _sample_part(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member name, or None for a name without a key.

    WebDataset's rule: the key is the path up to the first dot of the file name; a file name that
    starts with a dot (hidden, macOS "._" forks) has no key."""
    match = re.match(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else None


def _read_label(handle: BinaryIO, member: _Member, labels: dict[int, bytes]) -> str | None:
    """The text of a label member (from ``labels``, read during the index pass, else read now),
    stripped; None when empty."""
    data = labels.get(member.offset)
    if data is None:
        handle.seek(member.offset)
        data = handle.read(member.size)
    return data.decode("utf-8", errors="replace").strip() or None
