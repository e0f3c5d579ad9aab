"""A real S3 endpoint on loopback for the object-storage tests: moto's server in a thread of this
process, reached only through the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), as a user's MinIO or Ceph is. Nothing here
mocks a client: every request of pyarrow's S3 filesystem is HTTP to the server.
"""
from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs
import pytest

# Made-up keys: the server accepts any until told to check them (``refusing_credentials``)
ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "lrpscale-test", "AWS_SECRET_ACCESS_KEY": "lrpscale-test-secret",
               "AWS_REGION": "us-east-1"}


@dataclass(frozen=True)
class LoopbackS3:
    """The running server (``endpoint``, its URL) and what tests do with it."""

    endpoint: str

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (if new); returns its URI, ``s3://name``."""
        filesystem, path = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
        filesystem.create_dir(path)
        return f"s3://{name}"

    def upload(self, local: str | os.PathLike, uri: str) -> str:
        """Copy a local file, or a folder with everything in it, to ``uri``; returns ``uri``."""
        filesystem, path = _writer(uri)
        pafs.copy_files(os.fspath(local), path, destination_filesystem=filesystem)
        return uri

    def put(self, uri: str, content: bytes) -> str:
        """Write ``content`` as the object ``uri``; returns ``uri``."""
        filesystem, path = _writer(uri)
        with filesystem.open_output_stream(path) as stream:
            stream.write(content)
        return uri

    def delete(self, uri: str) -> None:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        filesystem.delete_file(path)

    @contextmanager
    def refusing_credentials(self) -> Iterator[None]:
        """While the block runs the server checks credentials, and the environment's made-up keys
        are unknown to it, as wrong keys are to a real store (moto's switch: POST /moto-api/reset-auth
        with the number of requests still let through)."""
        self._let_through(b"0")
        try:
            yield
        finally:
            self._let_through(b"inf")

    def _let_through(self, count: bytes) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def _writer(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) to write ``uri`` with: a small object in one PUT (``allow_delayed_open``)
    rather than a multipart upload of three requests, so seeding a thousand objects takes seconds."""
    return pafs.FileSystem.from_uri(f"{uri}?allow_delayed_open=true")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LoopbackS3]:
    """A moto S3 server on 127.0.0.1 (a free port) for the session, with the standard AWS
    environment variables pointing at it (restored afterwards); stopped at the end."""
    server_module = pytest.importorskip("moto.server", reason="the object-storage tests need moto[server] (the dev extra)")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # it would win over AWS_ENDPOINT_URL
            for name, value in {**ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}.items():
                patch.setenv(name, value)
            yield LoopbackS3(endpoint)
    finally:
        server.stop()
