"""Locations: one way to name where data lives, for datasets and runs alike. A location is a local
path or a URI (``file://``, ``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ...); ``resolve`` turns it
into a ``pyarrow.fs`` filesystem and a path in it, so every scheme takes the same code path and
credentials and endpoints come from each store's standard environment.
"""
from __future__ import annotations

import os
import posixpath
import re
import urllib.parse

import pyarrow.fs as pafs

# A URI starts with a scheme of two or more characters and "://"; "C:/data" is a Windows drive
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")

# Characters a path may hold unescaped in a URI (RFC 3986 pchar, with "/"): names stay readable,
# while a space, "#", "?" or "%" in an object's name is percent-encoded
_PATH_SAFE = "/!$&'()*+,;=:@~"

# Where each store reads credentials and endpoints from: words for messages only (resolution is pyarrow's)
_ENVIRONMENT = {
    "s3": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_REGION, and AWS_ENDPOINT_URL for "
          "an S3-compatible store such as MinIO or Ceph",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file)",
    "abfs": "AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET, or a managed identity",
    "hdfs": "the Hadoop configuration (HADOOP_HOME, CLASSPATH) and a Kerberos ticket where the cluster needs one",
}
_ENVIRONMENT.update(gcs=_ENVIRONMENT["gs"], abfss=_ENVIRONMENT["abfs"], viewfs=_ENVIRONMENT["hdfs"])

# How stores say "your credentials do not let you do this" and "there is no such bucket", across schemes
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|"
                     r"SignatureDoesNotMatch|PERMISSION_DENIED|UNAUTHENTICATED|AuthorizationFailure|"
                     r"AuthorizationPermissionMismatch|AuthenticationFailed|HTTP status (code )?40[13]|Forbidden|Unauthori[sz]ed")
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|ContainerNotFound|[Bb]ucket\b.* (does not exist|not found)")


def is_uri(location: str | bytes | os.PathLike) -> bool:
    """Whether a location is a URI (``scheme://...``) rather than a local path."""
    text = os.fspath(location)
    return isinstance(text, str) and _SCHEME.match(text) is not None


def local_path(location: str | os.PathLike) -> str | None:
    """The local path a location names: a path as given, or the path of a ``file://`` URI; None
    for a location on a store (any other scheme)."""
    text = os.fspath(location)
    if not is_uri(text):
        return text
    parts = urllib.parse.urlsplit(text)
    return urllib.parse.unquote(parts.path) if parts.scheme == "file" else None


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A location (a local path or a URI such as ``file://``, ``s3://``) -> (filesystem, path in it).

    Local paths become absolute; every URI goes through ``pyarrow.fs.FileSystem.from_uri``, so
    credentials and endpoints come from each store's standard environment (``from_uri`` reads
    ``AWS_ENDPOINT_URL``; a bare ``S3FileSystem()`` does not). Raises what ``from_uri`` raises."""
    text = os.fspath(location)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def join(location: str, relative: str) -> str:
    """A URI and a "/"-separated path below it -> the URI of that path, ``.`` and ``..`` resolved:
    ``join("s3://b/data", "cat/a b.png") == "s3://b/data/cat/a%20b.png"``. ``relative`` is a plain
    name (percent-encoded here, as ``from_uri`` decodes it); the URI's query (``?region=...``) is kept."""
    parts = urllib.parse.urlsplit(location)
    path = posixpath.normpath(f"{parts.path.rstrip('/')}/{urllib.parse.quote(relative, safe=_PATH_SAFE)}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def split(location: str) -> tuple[str, str]:
    """(the folder holding a location, its name): a URI's folder is a URI with the same query,
    its name decoded; a local path's folder is absolute."""
    if not is_uri(location):
        path = os.path.abspath(location)
        return os.path.dirname(path), os.path.basename(path)
    parts = urllib.parse.urlsplit(location)
    folder, _, name = parts.path.rstrip("/").rpartition("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, folder, parts.query, "")), urllib.parse.unquote(name)


def name_of(location: str | os.PathLike) -> str:
    """The last part of a location: a URI's decoded object name, a local path's folder name
    (resolved, so "." names the current folder)."""
    from pathlib import Path

    return split(os.fspath(location))[1] if is_uri(location) else Path(location).resolve().name


def child(location: str | os.PathLike, name: str) -> str | os.PathLike:
    """A location below another: a ``Path`` for a local one (callers join onto it), a URI for a
    URI (``join``)."""
    from pathlib import Path

    return join(os.fspath(location), name) if is_uri(location) else Path(location) / name


def local_copy(location: str, cache: str | os.PathLike | None = None) -> str:
    """A local file with the content of ``location``: the path itself when it is local, else a copy
    in ``cache`` (default ``~/.cache/lrpscale/files``) named by a hash of the URI and the object's
    size and modification time, downloaded once per node (a model's weights on a bucket)."""
    import hashlib

    path = local_path(location)
    if path is not None:
        return path
    filesystem, inner = resolve(location)
    try:
        info = filesystem.get_file_info(inner)
    except OSError as error:
        raise storage_error(location, error) from None
    if info.type != pafs.FileType.File:
        raise missing_error(location, filesystem, inner) if info.type == pafs.FileType.NotFound else \
            ValueError(f"{location} is not a file")
    folder = os.path.expanduser(os.fspath(cache or os.path.join("~", ".cache", "lrpscale", "files")))
    key = hashlib.sha256(f"{location}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    target = os.path.join(folder, f"{key}-{posixpath.basename(inner)}")
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        partial = f"{target}.{os.getpid()}.part"  # several actors of one node may fetch at once
        with filesystem.open_input_stream(inner) as source, open(partial, "wb") as out:
            while chunk := source.read(1 << 22):
                out.write(chunk)
        os.replace(partial, target)
    return target


def fetched(location: str | os.PathLike | None) -> str | os.PathLike | None:
    """None, a name or a local path as given; a URI (``s3://.../weights.pth``) as its ``local_copy``."""
    return local_copy(os.fspath(location)) if location is not None and is_uri(location) else location


def environment_hint(location: str) -> str:
    """Where the store of a URI reads its credentials and endpoint from, in words."""
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    return _ENVIRONMENT.get(scheme, f"the standard environment of {scheme}:// stores")


def storage_error(location: str, error: Exception) -> ValueError:
    """The ValueError for a store that refused or failed a request about ``location``: access
    denied (wrong or missing credentials), no such bucket, or unreachable; each names the location
    and what to do."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = environment_hint(location)
    if _DENIED.search(str(error)):
        return ValueError(f"{location}: access denied ({detail}); check the credentials in the environment ({hint}): "
                          f"they must allow listing and reading this location")
    if _NO_BUCKET.search(str(error)):
        return ValueError(f"{location}: the bucket does not exist ({detail}); check the bucket name, and that the "
                          f"environment points at the store that holds it ({hint})")
    return ValueError(f"cannot read {location}: {detail}; check the location and the store's settings ({hint})")


def missing_error(location: str, filesystem: pafs.FileSystem, path: str) -> ValueError:
    """The ValueError for a location that does not exist: its bucket (the first part of a path
    that does not start with "/", as object stores name them) when that is missing, else the path."""
    bucket = path.split("/", 1)[0]
    if bucket and not path.startswith("/"):
        try:
            found = filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as error:
            return storage_error(location, error)
        if not found:
            return ValueError(f"{location}: the bucket {bucket!r} does not exist; check the bucket name, and that the "
                              f"environment points at the store that holds it ({environment_hint(location)})")
    return ValueError(f"{location} does not exist: nothing is stored at that path or below it; check the path")
