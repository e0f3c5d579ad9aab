"""Inputs on object storage: each input kind in a bucket of a real S3 endpoint on loopback (moto's
server, reached only through the standard AWS environment) lists the rows and decodes the pixels
the same data gives on local disk; a listing pages through more than one LIST page; a missing
object is a read error row; bad storage input fails before anything starts, naming the location
and what to do."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrpscale.inputs import files
from lrpscale.inputs.decoding import load_batch
from lrpscale.inputs.sources import detect_kind, list_inputs
from lrpscale.locations import is_uri, join, local_path, split
from tests.helpers.digits import write_digits

SIZE = 8
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

# Each input kind (and the patterns of two of them), as a spec relative to the dataset's root
SPECS = {"folder": "folder", "manifest": "manifest.csv", "parquet": "parquet", "parquet glob": "parquet/*.parquet",
         "webdataset range": "shards/train-{000..002}.tar", "webdataset glob": "shards/train-*.tar"}


def load(table: pa.Table) -> dict[str, np.ndarray]:
    """``load_batch`` on a listing as Ray Data hands it (strings as object arrays)."""
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return load_batch(batch, SIZE, **UNIT)


def outcomes(batch: dict[str, np.ndarray]) -> dict[str, tuple[str, str] | None]:
    return {image_id: None if ok else (stage, kind) for image_id, ok, stage, kind
            in zip(batch["image_id"], batch["ok"], batch["error_stage"], batch["error_type"])}


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    """36 of scikit-learn's digits as every input kind under one root: ``folder/<class>/<i>.png``,
    ``manifest.csv`` (uris relative to it), ``parquet/part-{0,1}.parquet`` (row groups of 5) and
    ``shards/train-{000..002}.tar`` (``<i>.png`` and ``<i>.cls`` per sample)."""
    root = tmp_path_factory.mktemp("datasets")
    ids = sorted(write_digits(root / "folder", range(36)))
    images = [(image_id, (root / "folder" / image_id).read_bytes()) for image_id in ids]
    pd.DataFrame({"uri": [f"folder/{image_id}" for image_id in ids],
                  "label": [image_id.split("/")[0] for image_id in ids]}).to_csv(root / "manifest.csv", index=False)
    (root / "parquet").mkdir()
    (root / "shards").mkdir()
    for part in range(2):
        chunk = images[part * 18:(part + 1) * 18]
        pq.write_table(pa.table({"image": pa.array([data for _, data in chunk], pa.binary()),
                                 "label": [image_id.split("/")[0] for image_id, _ in chunk]}),
                       root / "parquet" / f"part-{part}.parquet", row_group_size=5)
    for shard in range(3):
        members = []
        for image_id, data in images[shard * 12:(shard + 1) * 12]:
            key = image_id.rsplit("/", 1)[1].removesuffix(".png")
            members += [(f"{key}.png", data), (f"{key}.cls", image_id.split("/")[0].encode())]
        write_shard(root / "shards" / f"train-{shard:03d}.tar", members)
    return root


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.bucket("datasets")


@pytest.fixture(scope="module")
def bucket_data(s3_server, bucket, local_data) -> str:
    """``local_data`` copied to ``s3://datasets/data``."""
    return s3_server.upload(local_data, f"{bucket}/data")


@pytest.mark.parametrize("spec", SPECS)
def test_each_kind_in_a_bucket_lists_and_decodes_as_on_local_disk(spec, local_data, bucket_data):
    local = list_inputs(local_data / SPECS[spec])
    remote = list_inputs(f"{bucket_data}/{SPECS[spec]}")
    assert detect_kind(f"{bucket_data}/{SPECS[spec]}") == detect_kind(str(local_data / SPECS[spec]))
    assert remote.num_rows == local.num_rows == 36
    for column in ("image_id", "label", "source", "member", "row", "offset", "size", "error_stage"):
        assert remote.column(column).to_pylist() == local.column(column).to_pylist(), column
    # the uri is the full location in the bucket, where the local one is the path on disk
    assert [uri.removeprefix(bucket_data) for uri in remote.column("uri").to_pylist()] == \
           [uri.removeprefix(str(local_data)) for uri in local.column("uri").to_pylist()]
    assert all(path.startswith(f"{bucket_data}/") for path in remote.column("path").to_pylist())
    local_batch, remote_batch = load(local), load(remote)
    assert remote_batch["ok"].all(), outcomes(remote_batch)
    np.testing.assert_array_equal(remote_batch["pixels"], local_batch["pixels"])


def test_manifests_with_absolute_s3_uris_in_a_bucket_and_on_disk(s3_server, bucket, bucket_data, local_data, tmp_path):
    folder = list_inputs(local_data / "folder")
    ids = folder.column("image_id").to_pylist()
    table = pd.DataFrame({"uri": [f"{bucket_data}/folder/{image_id}" for image_id in ids],
                          "label": folder.column("label").to_pylist()})
    remote_manifest = s3_server.put(f"{bucket}/manifests/absolute.csv", table.to_csv(index=False).encode())
    table.to_csv(tmp_path / "absolute.csv", index=False)
    for manifest in (remote_manifest, tmp_path / "absolute.csv"):
        listing = list_inputs(manifest)
        assert listing.column("image_id").to_pylist() == listing.column("uri").to_pylist() == table["uri"].tolist()
        assert listing.column("label").to_pylist() == folder.column("label").to_pylist()
        batch = load(listing)
        assert batch["ok"].all(), outcomes(batch)
        np.testing.assert_array_equal(batch["pixels"], load(folder)["pixels"])


def test_names_that_need_escaping_in_a_uri(s3_server, bucket, local_data):
    data = (local_data / "folder" / "0" / "0000.png").read_bytes()
    for name in ("a b.png", "c#1.png", "d%20e.png", "f+g=h.png"):
        s3_server.put(f"{bucket}/odd/x/{name.replace('%', '%25').replace(' ', '%20').replace('#', '%23')}", data)
    listing = list_inputs(f"{bucket}/odd")
    assert listing.column("image_id").to_pylist() == ["x/a b.png", "x/c#1.png", "x/d%20e.png", "x/f+g=h.png"]
    assert listing.column("uri").to_pylist() == [f"{bucket}/odd/x/a%20b.png", f"{bucket}/odd/x/c%231.png",
                                                 f"{bucket}/odd/x/d%2520e.png", f"{bucket}/odd/x/f+g=h.png"]
    assert load(listing)["ok"].all()


def test_a_missing_object_is_a_read_error_row(s3_server, bucket, local_data):
    uri = s3_server.upload(local_data / "folder", f"{bucket}/shrinking")
    s3_server.put(f"{bucket}/shrinking.csv", b"uri,label\nshrinking/1/0001.png,1\nshrinking/9/none.png,9\n")
    listing = list_inputs(uri)
    manifest = list_inputs(f"{bucket}/shrinking.csv")
    s3_server.delete(f"{uri}/0/0000.png")  # gone between listing and reading
    batch = load(listing)
    assert outcomes(batch)["0/0000.png"] == ("read", "missing")
    assert f"no image file at {uri}/0/0000.png" in batch["error_message"][0]
    assert sum(batch["ok"]) == listing.num_rows - 1
    assert outcomes(load(manifest)) == {"shrinking/1/0001.png": None, "shrinking/9/none.png": ("read", "missing")}


def test_a_prefix_of_more_objects_than_one_list_page_is_listed_whole(s3_server, bucket, tmp_path):
    (tmp_path / "many" / "7").mkdir(parents=True)
    for index in range(1100):  # moto, like S3, returns at most 1000 keys a page
        (tmp_path / "many" / "7" / f"{index:05d}.png").write_bytes(b"x")
    uri = s3_server.upload(tmp_path / "many", f"{bucket}/many")
    listing = list_inputs(uri)
    assert listing.column("image_id").to_pylist() == [f"7/{index:05d}.png" for index in range(1100)]
    assert set(listing.column("label").to_pylist()) == {"7"}


def test_a_bucket_that_does_not_exist(s3_server):
    for spec in ("s3://no-such-bucket/data", "s3://no-such-bucket/shards/train-*.tar", "s3://no-such-bucket/list.csv"):
        with pytest.raises(ValueError, match=r"the bucket 'no-such-bucket' does not exist; check the bucket name") as error:
            list_inputs(spec)
        assert spec.split("/shards")[0] in str(error.value)
    with pytest.raises(ValueError, match=r"s3://no-such-bucket/data: the bucket 'no-such-bucket' does not exist"):
        list_inputs("s3://no-such-bucket/data", kind="folder")


def test_wrong_credentials(s3_server, bucket_data):
    with s3_server.refusing_credentials():
        for spec, kind in ((f"{bucket_data}/folder", None), (f"{bucket_data}/folder", "folder"),
                           (f"{bucket_data}/shards/train-*.tar", None)):
            with pytest.raises(ValueError, match=r"access denied .*check the credentials in the environment "
                                                 r"\(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY") as error:
                list_inputs(spec, kind)
            assert str(error.value).startswith(spec.split("/train-")[0])


def test_a_prefix_without_images(s3_server, bucket):
    s3_server.put(f"{bucket}/notes/readme.txt", b"no images here")
    with pytest.raises(ValueError, match=rf"directory '{bucket}/notes' holds no image files.*; pass the folder"):
        list_inputs(f"{bucket}/notes")
    with pytest.raises(ValueError, match=rf"no inputs found in '{bucket}/notes' \(kind folder; skipped 1 file that is "
                                         rf"not an image \(\.txt\)\); check that it is the location"):
        list_inputs(f"{bucket}/notes", kind="folder")
    with pytest.raises(ValueError, match=rf"{bucket}/nothing-here does not exist: nothing is stored at that path"):
        list_inputs(f"{bucket}/nothing-here")


def test_a_trailing_slash_and_a_file_uri_name_the_same_inputs(local_data, bucket_data):
    remote = list_inputs(f"{bucket_data}/folder")
    assert list_inputs(f"{bucket_data}/folder/").to_pydict() == remote.to_pydict()
    # a file:// URI is the local path it names, listed by the local walk (links, FIFOs and all)
    assert list_inputs(f"file://{local_data}/folder").to_pydict() == list_inputs(local_data / "folder").to_pydict()


def test_readers_share_one_filesystem_per_store(bucket_data):
    first, _ = files._store_filesystem(f"{bucket_data}/folder/0/0000.png")
    second, path = files._store_filesystem(f"{bucket_data}/folder/1/0001.png")
    assert first is second  # one connection pool for the files of a store, not one per file
    assert path == f"{bucket_data.removeprefix('s3://')}/folder/1/0001.png"


def test_locations_name_paths_below_a_uri():
    assert is_uri("s3://b/x") and is_uri("hdfs://nn:8020/x") and not is_uri("C:/data") and not is_uri("/data/a://b")
    assert local_path("file:///data/a%20b") == "/data/a b" and local_path("data/x") == "data/x"
    assert local_path("s3://b/x") is None
    assert join("s3://b/data?region=eu-west-1", "cat/a b#1.png") == "s3://b/data/cat/a%20b%231.png?region=eu-west-1"
    assert join("s3://b/data/", "../other/./x.png") == "s3://b/other/x.png"
    assert split("s3://b/data/list%20a.csv?region=eu-west-1") == ("s3://b/data?region=eu-west-1", "list a.csv")
