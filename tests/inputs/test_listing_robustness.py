"""Odd inputs, built for real in tmp_path: names that are not UTF-8, symbolic links (inside and
outside the root, loops, dangling), FIFOs and sockets, tar shards cut short or holding links,
skipped-entry reporting, messages that never quote file contents, EXIF orientation and messages
that name real options. Each test checks the listing rows and that ``load_batch`` gives pixels or
one error row per input."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tarfile
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lrpscale.inputs.decoding import decode, load_batch
from lrpscale.inputs.errors import ERROR_TYPES, InputError
from lrpscale.inputs.names import ENCODED_PATH_PREFIX
from lrpscale.inputs.preprocess import preprocess
from lrpscale.inputs.skipped import skipped_entries, skipped_summary
from lrpscale.inputs.sources import LISTING_SCHEMA, detect_kind, list_inputs

SIZE = 16
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixels stay in [0, 1]
REPOSITORY = Path(__file__).resolve().parents[2]
SECRET = "root:x:0:0:root:/root:/bin/bash\n"  # what a link to /etc/passwd would read


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


PNG = encode(Image.fromarray(np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)))
OTHER_PNG = encode(Image.new("RGB", (12, 8), (10, 200, 30)))
EXPECTED = preprocess(Image.open(io.BytesIO(PNG)), SIZE, **UNIT)


def load(table: pa.Table) -> dict[str, np.ndarray]:
    """``load_batch`` on the whole listing, as the audit's CPU tasks call it on a numpy batch."""
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return load_batch(batch, SIZE, **UNIT)


def outcomes(batch: dict[str, np.ndarray]) -> dict[str, tuple[str, str] | None]:
    """image_id -> (error_stage, error_type), or None for a good row; every input exactly once."""
    assert len(set(batch["image_id"])) == len(batch["image_id"])
    return {image_id: None if ok else (stage, kind) for image_id, ok, stage, kind
            in zip(batch["image_id"], batch["ok"], batch["error_stage"], batch["error_type"])}


def rows(table: pa.Table) -> dict[str, dict]:
    return {row["image_id"]: row for row in table.to_pylist()}


def write(path, content: bytes = PNG) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)
    return os.fsdecode(path)


def assert_storable(table: pa.Table, tmp_path) -> None:
    """The listing is valid Arrow text: it writes to Parquet (a name with undecodable bytes used to crash here)."""
    assert table.schema.equals(LISTING_SCHEMA)
    pq.write_table(table, tmp_path / "listing.parquet")
    assert pq.read_table(tmp_path / "listing.parquet").equals(table)


# ---------------------------------------------------------------------------------------------
# 1. File names in any bytes


def test_folder_names_that_are_not_utf8_are_listed_percent_encoded_and_read(tmp_path):
    root = tmp_path / "images"
    raw_root = os.fsencode(str(root))
    os.makedirs(root / "0")
    write(os.path.join(raw_root, b"0", b"caf\xe9.png"))
    write(os.path.join(raw_root, b"0", b"100%.png"), OTHER_PNG)         # valid UTF-8 with a literal %: unchanged
    write(os.path.join(raw_root, b"0", b"1\xe900%.png"))                # needs encoding: its % is encoded too
    write(os.path.join(raw_root, b"d\xe9j\xe0", b"x.png"))              # a class folder in Latin-1
    table = list_inputs(root)
    assert_storable(table, tmp_path)
    listed = rows(table)
    assert list(listed) == ["0/1%E900%25.png", "0/100%.png", "0/caf%E9.png", "d%E9j%E0/x.png"]
    assert [row["label"] for row in listed.values()] == ["0", "0", "0", "d%E9j%E0"]
    assert listed["0/caf%E9.png"]["uri"] == f"{root}/0/caf%E9.png"
    assert listed["0/100%.png"]["path"] == f"{root}/0/100%.png"
    for image_id, raw in (("0/caf%E9.png", b"0/caf\xe9.png"), ("0/1%E900%25.png", b"0/1\xe900%.png"),
                          ("d%E9j%E0/x.png", b"d\xe9j\xe0/x.png")):
        path = listed[image_id]["path"]
        assert path.startswith(ENCODED_PATH_PREFIX)
        assert urllib.parse.unquote_to_bytes(path[len(ENCODED_PATH_PREFIX):]) == raw_root + b"/" + raw
    batch = load(table)
    assert outcomes(batch) == dict.fromkeys(listed)
    np.testing.assert_array_equal(batch["pixels"][2], EXPECTED)
    assert not np.array_equal(batch["pixels"][1], EXPECTED)  # 100%.png holds the other picture


def test_a_root_whose_own_name_is_not_utf8_keeps_plain_ids(tmp_path):
    root = os.path.join(os.fsencode(str(tmp_path)), b"donn\xe9es")
    write(os.path.join(root, b"cat", b"a.png"))
    table = list_inputs(os.fsdecode(root))
    assert table.column("image_id").to_pylist() == ["cat/a.png"]
    assert table.column("uri").to_pylist() == [f"{tmp_path}/donn%E9es/cat/a.png"]
    assert_storable(table, tmp_path)
    np.testing.assert_array_equal(load(table)["pixels"][0], EXPECTED)


def test_an_encoded_name_equal_to_a_valid_name_leaves_the_valid_one_its_id(tmp_path, caplog):
    raw_root = os.fsencode(str(tmp_path / "images"))
    write(os.path.join(raw_root, b"caf%E9.png"), OTHER_PNG)  # spelled out: valid UTF-8, keeps its id
    write(os.path.join(raw_root, b"caf\xe9.png"))
    with caplog.at_level(logging.WARNING, logger="lrpscale.inputs.sources"):
        table = list_inputs(tmp_path / "images")
    assert table.column("path").to_pylist() == [str(tmp_path / "images" / "caf%E9.png")]
    assert skipped_entries(table) == {"name_collision": 1}
    assert "b'caf\\xe9.png' is left out" in caplog.text and "rename one of them" in caplog.text


def test_tar_member_names_that_are_not_utf8(tmp_path):
    shard = tmp_path / "shards" / "s.tar"
    os.makedirs(shard.parent)
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in ((os.fsdecode(b"caf\xe9.png"), PNG), (os.fsdecode(b"caf\xe9.cls"), b"d\xc3\xa9j\xc3\xa0")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    table = list_inputs(shard)
    assert_storable(table, tmp_path)
    assert rows(table) == {"s.tar#caf%E9": {
        "image_id": "s.tar#caf%E9", "uri": f"{shard}#caf%E9.png", "label": "déjà", "source": "webdataset",
        "path": str(shard), "member": "caf%E9.png", "row": -1, "offset": 512, "size": len(PNG),
        "error_stage": None, "error_type": None, "error_message": None}}
    np.testing.assert_array_equal(load(table)["pixels"][0], EXPECTED)


# ---------------------------------------------------------------------------------------------
# 2. Symbolic links


def test_links_inside_the_root_are_followed_and_listed_under_each_path(tmp_path):
    root = tmp_path / "images"
    write(root / "0" / "a.png")
    write(root / "shared" / "b.png", OTHER_PNG)
    os.symlink("0", root / "1")                       # a class folder reached twice
    os.symlink("../shared/b.png", root / "0" / "c.png")
    table = list_inputs(root)
    assert table.column("image_id").to_pylist() == ["0/a.png", "0/c.png", "1/a.png", "1/c.png", "shared/b.png"]
    assert table.column("label").to_pylist() == ["0", "0", "1", "1", "shared"]
    assert table.column("path").to_pylist()[2] == str(root / "1" / "a.png")  # the link's path, opened through it
    batch = load(table)
    assert all(batch["ok"])
    np.testing.assert_array_equal(batch["pixels"][2], EXPECTED)


def test_links_outside_the_root_are_error_rows_unless_followed_on_request(tmp_path):
    root = tmp_path / "data" / "images"
    write(tmp_path / "elsewhere" / "0" / "a.png")
    write(tmp_path / "elsewhere" / "lone.png", OTHER_PNG)
    write(root / "1" / "b.png")
    os.symlink("../../elsewhere/0", root / "0")
    os.symlink(tmp_path / "elsewhere" / "lone.png", root / "1" / "lone.png")
    table = list_inputs(root)
    listed = rows(table)
    assert {image_id: row["error_type"] for image_id, row in listed.items()} == {
        "0": "outside_root", "1/b.png": None, "1/lone.png": "outside_root"}
    assert listed["0"]["label"] == "0"  # the class folder that was not followed
    message = listed["0"]["error_message"]
    assert str(root / "0") in message and str(tmp_path / "elsewhere" / "0") in message
    assert "follow_external_links=True" in message
    assert outcomes(load(table)) == {"0": ("list", "outside_root"), "1/b.png": None, "1/lone.png": ("list", "outside_root")}

    followed = list_inputs(root, follow_external_links=True)
    assert followed.column("image_id").to_pylist() == ["0/a.png", "1/b.png", "1/lone.png"]
    assert followed.column("label").to_pylist() == ["0", "1", "1"]
    batch = load(followed)
    assert all(batch["ok"])
    np.testing.assert_array_equal(batch["pixels"][0], EXPECTED)
    assert detect_kind(str(tmp_path / "data")) == "folder"


def test_a_folder_loop_is_one_error_row_and_the_walk_ends(tmp_path):
    root = tmp_path / "images"
    write(root / "a" / "x.png")
    os.symlink("..", root / "a" / "loop")
    table = list_inputs(root)
    listed = rows(table)
    assert {image_id: row["error_type"] for image_id, row in listed.items()} == {"a/loop": "link_loop", "a/x.png": None}
    assert listed["a/loop"]["label"] == "a"
    assert listed["a/loop"]["error_message"] == (f"{root}/a/loop leads back to {root}, a folder it is inside of; it is "
                                                 f"not entered (that would never end); remove the link or point it elsewhere")
    assert outcomes(load(table)) == {"a/loop": ("list", "link_loop"), "a/x.png": None}


def test_loops_through_several_links_end_with_one_row_per_path_that_closes_them(tmp_path):
    root = tmp_path / "images"
    write(root / "a" / "x.png")
    write(root / "b" / "y.png")
    os.symlink("../b", root / "a" / "to_b")        # a/to_b -> b and b/to_a -> a
    os.symlink("../a", root / "b" / "to_a")
    os.symlink("..", root / "a" / "loop")          # reached as a/loop and as b/to_a/loop
    table = list_inputs(root)
    assert {image_id: row["error_type"] for image_id, row in rows(table).items()} == {
        "a/loop": "link_loop", "a/to_b/to_a": "link_loop", "a/to_b/y.png": None, "a/x.png": None,
        "b/to_a/loop": "link_loop", "b/to_a/to_b": "link_loop", "b/to_a/x.png": None, "b/y.png": None}
    assert sum(outcome is None for outcome in outcomes(load(table)).values()) == 4


def test_dangling_links_and_link_chains_without_an_end(tmp_path):
    root = tmp_path / "images"
    write(root / "ok.png")
    os.symlink("nowhere.png", root / "gone.png")
    os.symlink("nowhere", root / "gone_class")        # could have been a folder of images
    os.symlink("nowhere.txt", root / "notes.txt")      # not an image name: skipped like any .txt
    os.symlink("ring2.png", root / "ring1.png")
    os.symlink("ring1.png", root / "ring2.png")
    table = list_inputs(root)
    listed = rows(table)
    assert {image_id: row["error_type"] for image_id, row in listed.items()} == {
        "gone.png": "missing", "gone_class": "missing", "ok.png": None, "ring1.png": "link_loop", "ring2.png": "link_loop"}
    assert listed["gone.png"]["error_message"] == (f"{root}/gone.png is a symbolic link to nowhere.png, which does not "
                                                   f"exist; restore the target or remove the link")
    assert skipped_entries(table) == {"other_extension": 1}
    assert outcomes(load(table))["ok.png"] is None


# ---------------------------------------------------------------------------------------------
# 3. FIFOs, sockets and devices are error rows and never opened

FIFO_SCRIPT = """
import json, sys
from lrpscale.inputs.decoding import load_batch
from lrpscale.inputs.sources import list_inputs
result = {}
for spec in sys.argv[1:]:
    table = list_inputs(spec)
    batch = load_batch({name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names},
                       8, (0, 0, 0), (1, 1, 1))
    result[spec] = {image_id: [bool(ok), stage, kind, message] for image_id, ok, stage, kind, message in zip(
        batch["image_id"], batch["ok"], batch["error_stage"], batch["error_type"], batch["error_message"])}
print(json.dumps(result))
"""


def test_fifos_are_error_rows_and_never_opened(tmp_path):
    folder, shards, tables = tmp_path / "folder", tmp_path / "shards", tmp_path / "tables"
    write(folder / "cat" / "ok.png")
    os.mkfifo(folder / "cat" / "x.png")
    os.mkfifo(folder / "notes.txt")                    # not an image name: skipped, not opened either
    os.symlink("cat/x.png", folder / "link.png")       # a link to the FIFO
    os.mkfifo(tmp_path / "stream.png")                 # named by a manifest: found at read time
    write(tmp_path / "ok.png")
    pd.DataFrame({"uri": ["ok.png", "stream.png"]}).to_csv(tmp_path / "manifest.csv", index=False)
    write_shard(shards / "a.tar", [("s.png", PNG)])
    os.mkfifo(shards / "b.tar")
    os.makedirs(tables)
    pq.write_table(pa.table({"image": pa.array([PNG], pa.binary())}), tables / "a.parquet")
    os.mkfifo(tables / "b.parquet")
    specs = [str(folder), str(tmp_path / "manifest.csv"), str(shards), str(tables)]
    done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, *specs], capture_output=True, text=True, timeout=60,
                          cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    summary = {spec: {image_id: tuple(row[:3]) for image_id, row in result[spec].items()} for spec in specs}
    assert summary == {
        str(folder): {"cat/ok.png": (True, None, None), "cat/x.png": (False, "list", "not_a_file"),
                      "link.png": (False, "list", "not_a_file")},
        str(tmp_path / "manifest.csv"): {"ok.png": (True, None, None), "stream.png": (False, "read", "not_a_file")},
        str(shards): {"a.tar#s": (True, None, None), "b.tar": (False, "list", "not_a_file")},
        str(tables): {"a.parquet#0": (True, None, None), "b.parquet": (False, "list", "not_a_file")}}
    assert result[str(folder)]["cat/x.png"][3] == (f"{folder}/cat/x.png is a FIFO (named pipe), not a regular file; it is "
                                                   f"never opened (reading one can block forever); replace it with the "
                                                   f"file itself or remove it")


def test_sockets_and_devices_are_error_rows(tmp_path, monkeypatch):
    root = tmp_path / "images"
    write(root / "ok.png")
    monkeypatch.chdir(root)  # a socket's path must be short: bind it by its relative name
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("s.png")
        os.symlink(os.devnull, root / "null.png")  # a character device, outside the root
        inside = rows(list_inputs(root))
        followed = list_inputs(root, follow_external_links=True)
    assert {image_id: row["error_type"] for image_id, row in inside.items()} == {
        "null.png": "outside_root", "ok.png": None, "s.png": "not_a_file"}
    assert "is a socket" in inside["s.png"]["error_message"]
    assert outcomes(load(followed)) == {"null.png": ("list", "not_a_file"), "ok.png": None, "s.png": ("list", "not_a_file")}
    assert "is a character device" in rows(followed)["null.png"]["error_message"]


# ---------------------------------------------------------------------------------------------
# 4. Tar shards cut short, hard links and symbolic links inside shards


def write_shard(path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size = len(member[1])
            tar.addfile(info, io.BytesIO(member[1]))
    return str(path)


def link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def three_samples() -> list[tuple[str, bytes]]:
    return [member for key in ("s0", "s1", "s2") for member in ((f"{key}.png", PNG), (f"{key}.cls", key[1].encode()))]


def test_a_shard_cut_inside_its_third_sample_keeps_the_first_two(tmp_path):
    shard = write_shard(tmp_path / "shard.tar", three_samples())
    with tarfile.open(shard) as tar:
        cut = tar.getmember("s2.png").offset_data + 20
    os.truncate(shard, cut)
    table = list_inputs(shard)
    listed = rows(table)
    assert table.column("label").to_pylist() == ["0", "1", None]
    assert {image_id: row["error_type"] for image_id, row in listed.items()} == {
        "shard.tar#s0": None, "shard.tar#s1": None, "shard.tar#s2": "truncated"}
    assert listed["shard.tar#s2"]["error_message"] == (
        f"tar shard {shard} ends inside member s2.png: 20 of its {len(PNG)} bytes are there (the shard was cut short, "
        f"e.g. by an interrupted copy); copy the shard again")
    batch = load(table)
    assert outcomes(batch) == {"shard.tar#s0": None, "shard.tar#s1": None, "shard.tar#s2": ("list", "truncated")}
    np.testing.assert_array_equal(batch["pixels"][1], EXPECTED)


def test_a_shard_cut_between_members_flags_its_last_sample(tmp_path):
    shard = write_shard(tmp_path / "shard.tar", three_samples())
    with tarfile.open(shard) as tar:
        cut = tar.getmember("s1.cls").offset  # s1's label and all of s2 are gone
    os.truncate(shard, cut + 100)             # ... and the file ends inside s1.cls's header
    listed = rows(list_inputs(shard))
    assert {image_id: row["error_type"] for image_id, row in listed.items()} == {
        "shard.tar#s0": None, "shard.tar#s1": "truncated"}
    assert listed["shard.tar#s1"]["error_message"].startswith(
        f"tar shard {shard} ends at byte {cut + 100} after member s1.png without tar's end-of-archive marker")


@pytest.mark.parametrize("content, error_type, words", [
    (gzip.compress(PNG * 50), "unreadable", "is gzip-compressed; WebDataset shards are read as uncompressed tar files"),
    (b"just some text that is long enough to fill a tar header block\n" * 20, "unreadable",
     "is not a tar file: it does not start with a valid tar header"),
    (b"", "empty", "is a zero-byte file"),
])
def test_a_file_that_is_not_a_tar_is_one_clear_error_row(tmp_path, content, error_type, words):
    shard = write(tmp_path / "shard.tar", content)
    table = list_inputs(shard)
    assert table.column("image_id").to_pylist() == ["shard.tar"]
    assert table.column("error_type").to_pylist() == [error_type]
    message = table.column("error_message")[0].as_py()
    assert words in message and shard in message
    assert "just some" not in message
    assert outcomes(load(table)) == {"shard.tar": ("list", error_type)}


def test_hard_and_symbolic_links_inside_a_shard(tmp_path):
    shard = write_shard(tmp_path / "shard.tar", [
        ("a.png", PNG), ("a.cls", b"7"),
        link_member("b.png", "a.png", tarfile.LNKTYPE), link_member("b.cls", "a.cls", tarfile.LNKTYPE),
        link_member("c.png", "gone.png", tarfile.LNKTYPE),
        link_member("d.png", "/etc/passwd", tarfile.SYMTYPE), ("d.cls", b"3"),
        ("e.png", OTHER_PNG)])
    table = list_inputs(shard)
    listed = rows(table)
    assert {image_id: (row["label"], row["error_type"]) for image_id, row in listed.items()} == {
        "shard.tar#a": ("7", None), "shard.tar#b": ("7", None), "shard.tar#c": (None, "missing"),
        "shard.tar#d": ("3", "symlink_member"), "shard.tar#e": (None, None)}
    assert listed["shard.tar#b"]["member"] == "b.png"
    assert listed["shard.tar#b"]["offset"] == listed["shard.tar#a"]["offset"]  # the target's data
    assert "hard link to gone.png, which is not an earlier member" in listed["shard.tar#c"]["error_message"]
    assert "symbolic link (to /etc/passwd); links in shards are never followed" in listed["shard.tar#d"]["error_message"]
    batch = load(table)
    assert [outcome for outcome in outcomes(batch).values()] == [
        None, None, ("list", "missing"), ("list", "symlink_member"), None]
    np.testing.assert_array_equal(batch["pixels"][1], EXPECTED)
    np.testing.assert_array_equal(batch["pixels"][1], batch["pixels"][0])


def test_a_broken_shard_does_not_hide_the_others(tmp_path):
    write_shard(tmp_path / "shards" / "a.tar", [("x.png", PNG)])
    write(tmp_path / "shards" / "b.tar", b"garbage" * 100)
    os.symlink("nowhere.tar", tmp_path / "shards" / "c.tar")
    table = list_inputs(tmp_path / "shards" / "*.tar")
    assert outcomes(load(table)) == {"a.tar#x": None, "b.tar": ("list", "unreadable"), "c.tar": ("list", "missing")}


# ---------------------------------------------------------------------------------------------
# 5. What a listing skipped, and why


def test_skipped_entries_are_counted_logged_once_and_kept_in_the_metadata(tmp_path, caplog):
    root = tmp_path / "images"
    for name in ("cat/a.png", ".hidden.png", ".cache/b.png", "cat/.c.png", "notes.txt", "cat/meta.json", "dog/readme"):
        write(root / name)
    with caplog.at_level(logging.INFO, logger="lrpscale.inputs.sources"):
        table = list_inputs(root)
    assert table.column("image_id").to_pylist() == ["cat/a.png"]
    assert skipped_entries(table) == {"hidden": 3, "other_extension": 3}
    summary = "skipped 3 hidden entries, 3 files that are not images ((none), .json, .txt)"
    assert skipped_summary(table) == summary
    assert json.loads(table.schema.metadata[b"lrpscale.skipped"])["counts"] == {"hidden": 3, "other_extension": 3}
    lines = [record.getMessage() for record in caplog.records if record.name == "lrpscale.inputs.sources"]
    assert lines == [f"folder input {str(root)!r}: listed 1 inputs (0 already errors); {summary}"]


def test_skips_in_tar_shards_and_an_empty_listing_say_what_was_skipped(tmp_path):
    shard = write_shard(tmp_path / "shards" / "a.tar", [("s.png", PNG), ("._s.png", PNG), ("README", b"x")])
    write(tmp_path / "shards" / "notes.md", b"x")
    table = list_inputs(tmp_path / "shards")
    assert table.column("image_id").to_pylist() == ["a.tar#s"]
    assert skipped_summary(table) == ("skipped 1 hidden entry, 1 file that is not a .tar file (.md), "
                                      "1 tar member without a sample key")
    assert skipped_summary(list_inputs(shard)) == "skipped 1 hidden entry, 1 tar member without a sample key"
    write(tmp_path / "only" / "a.png")
    write(tmp_path / "only" / "b.heic")
    os.remove(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match=r"no inputs found .*skipped 1 file that is not an image \(\.heic\)"):
        list_inputs(tmp_path / "only", kind="folder")


# ---------------------------------------------------------------------------------------------
# 6. Messages say what happened to which input, never what the file contains


def broken_png_chunk() -> bytes:
    """A PNG whose second IDAT chunk has an invalid type: PIL's error quotes those 4 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(24)) for _ in range(8)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels[:10]) + struct.pack(">I", len(pixels) - 10) + b"ro:t" + pixels[10:] + bytes(4)
            + chunk(b"IEND", b""))


def test_messages_never_quote_file_contents(tmp_path):
    root = tmp_path / "images"
    secret = write(tmp_path / "private" / "passwd", SECRET.encode())
    write(root / "inside" / "passwd.png", SECRET.encode())
    os.symlink(secret, root / "passwd_link.png")
    write(root / "binary.png", bytes(range(256)) * 4)
    write(root / "archive.png", gzip.compress(SECRET.encode()))
    write(root / "chunk.png", broken_png_chunk())
    batch = load(list_inputs(root, follow_external_links=True))
    messages = dict(zip(batch["image_id"], batch["error_message"]))
    assert outcomes(batch) == {"archive.png": ("decode", "not_an_image"), "binary.png": ("decode", "not_an_image"),
                               "chunk.png": ("decode", "corrupt"), "inside/passwd.png": ("decode", "not_an_image"),
                               "passwd_link.png": ("decode", "not_an_image")}
    assert messages["passwd_link.png"] == f"{len(SECRET)} bytes that PIL cannot identify as an image; it looks like text"
    assert messages["archive.png"].endswith("; it looks like gzip-compressed data")
    assert messages["binary.png"] == "1024 bytes that PIL cannot identify as an image"
    assert messages["chunk.png"] == f"SyntaxError: broken PNG file (chunk <bytes>) ({len(broken_png_chunk())} bytes)"
    for message in messages.values():
        assert "root" not in message and "ro:t" not in message and "b'" not in message and '\\x' not in message


def test_decode_names_its_errors_without_quoting(tmp_path):
    with pytest.raises(InputError, match=r"^15 bytes that PIL cannot identify as an image; it looks like text$"):
        decode(b"root:x:0:0:r\n\tz")


# ---------------------------------------------------------------------------------------------
# 7. EXIF orientation: analysed as displayed


def quadrants(width: int, height: int) -> Image.Image:
    """Four flat colours, one per quarter: any turn or mirror moves them; flat areas keep JPEG close."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = (230, 20, 20)
    array[: height // 2, width // 2:] = (20, 230, 20)
    array[height // 2:, : width // 2] = (20, 20, 230)
    array[height // 2:, width // 2:] = (230, 230, 20)
    return Image.fromarray(array)


def test_exif_orientation_is_applied_as_displayed(tmp_path):
    stored = quadrants(64, 32)                        # as the camera stored it: landscape
    exif = Image.Exif()
    exif[0x0112] = 6                                  # Orientation 6: display turned 90 degrees clockwise
    write(tmp_path / "images" / "tagged.jpg", encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    displayed = stored.transpose(Image.Transpose.ROTATE_270)
    write(tmp_path / "images" / "turned.jpg", encode(displayed, "JPEG", quality=95))
    write(tmp_path / "images" / "untagged.jpg", encode(stored, "JPEG", quality=95))
    batch = load(list_inputs(tmp_path / "images"))
    assert batch["image_id"].tolist() == ["tagged.jpg", "turned.jpg", "untagged.jpg"] and all(batch["ok"])
    tagged, turned, untagged = batch["pixels"]
    np.testing.assert_allclose(tagged, turned, atol=0.05)
    assert np.abs(tagged - untagged).max() > 0.5
    image = decode((tmp_path / "images" / "tagged.jpg").read_bytes())
    assert image.size == (32, 64) and image.getexif().get(0x0112) is None
    np.testing.assert_array_equal(preprocess(image, SIZE, **UNIT), tagged)  # applying it twice changes nothing
    raw = Image.open(tmp_path / "images" / "tagged.jpg")
    np.testing.assert_array_equal(preprocess(raw, SIZE, **UNIT), tagged)    # preprocess alone turns it too


# ---------------------------------------------------------------------------------------------
# 8. Messages name the real options


def test_messages_name_the_command_line_option_or_say_python_api(tmp_path):
    write(tmp_path / "odd.bin", b"x")
    with pytest.raises(ValueError) as raised:
        detect_kind(str(tmp_path / "odd.bin"))
    assert "--input-kind" in str(raised.value) and "kind= in the Python API" in str(raised.value)

    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"])}), tmp_path / "two.parquet")
    with pytest.raises(ValueError) as raised:
        list_inputs(tmp_path / "two.parquet", kind="parquet")
    message = str(raised.value)
    assert "image, image_bytes, bytes, img, jpg, png" in message and "rename the image column" in message
    assert "the command line has no option for it" in message and "image_column= in the Python API" in message
    assert "--image-column" not in message


def test_a_parquet_file_without_the_image_column_among_good_ones_is_an_error_row(tmp_path):
    os.makedirs(tmp_path / "p")
    pq.write_table(pa.table({"image": pa.array([PNG], pa.binary())}), tmp_path / "p" / "a.parquet")
    pq.write_table(pa.table({"note": ["x"]}), tmp_path / "p" / "b.parquet")
    pq.write_table(pa.table({"image": pa.array([PNG], pa.binary())}), tmp_path / "p" / "c.parquet")
    table = list_inputs(tmp_path / "p")
    assert outcomes(load(table)) == {"a.parquet#0": None, "b.parquet": ("list", "no_image_column"), "c.parquet#0": None}


def test_every_error_type_used_here_is_documented():
    used = {"outside_root", "link_loop", "not_a_file", "symlink_member", "no_image_column", "missing", "truncated",
            "unreadable", "empty", "not_an_image", "corrupt"}
    assert used <= set(ERROR_TYPES)
