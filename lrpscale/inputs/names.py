"""File names in any bytes: the OS hands Python undecodable bytes of a name as lone surrogates
(U+DC80..U+DCFF, "surrogateescape"), which Arrow cannot store as UTF-8 text; these give such a name's
text for ids, uris and messages, and the ``path`` column value that opens it again; and extensions."""
from __future__ import annotations

import os
import urllib.parse

# The extensions that make a name an image: in a folder walk, and as a WebDataset sample's member
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff",
                    "ppm", "pgm", "pbm", "pnm")
ENCODED_PATH_PREFIX = "fs-bytes:"  # a path column value holding the percent-encoded bytes of a path


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


def _extension(name: str) -> str:
    """The lower-case extension of a name without its dot, "" for none."""
    return name.rsplit(".", 1)[1].lower() if "." in name.rsplit("/", 1)[-1] else ""
