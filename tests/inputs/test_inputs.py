"""Input sources: listing and stable ids per kind, identical pixels across kinds, unusual image
modes, and the bad-input corpus. Every fixture is built here at test time; no Ray is needed."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from lrpscale.inputs import files
from lrpscale.inputs.decoding import load_batch, split_errors
from lrpscale.inputs.errors import ERROR_COLUMNS, ERROR_TYPES, error_row
from lrpscale.inputs.preprocess import preprocess
from lrpscale.inputs.sources import LISTING_SCHEMA, SOURCES, detect_kind, list_inputs

SIZE = 16
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixels stay in [0, 1]


class Sample(NamedTuple):
    key: str
    label: str
    extension: str
    data: bytes


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def as_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """The numpy batch Ray Data's map_batches hands a function: strings as object arrays, nulls as None."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def load(table: pa.Table, size: int = SIZE, **options) -> dict[str, np.ndarray]:
    return load_batch(as_batch(table), size, **UNIT, **options)


def outcomes(batch: dict[str, np.ndarray]) -> dict[str, tuple[str, str] | None]:
    """image_id -> (error_stage, error_type), or None for a good row."""
    return {image_id: None if ok else (stage, kind) for image_id, ok, stage, kind
            in zip(batch["image_id"], batch["ok"], batch["error_stage"], batch["error_type"])}


def write(path, content: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)
    return str(path)


def write_shard(path, members: list[tuple[str, bytes]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return str(path)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height; no pixel data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """scikit-learn's two photos, shrunk so the suite stays fast."""
    bunch = load_sample_images()
    return {os.path.splitext(os.path.basename(path))[0]: Image.fromarray(array).resize((48, 32), Image.BILINEAR)
            for path, array in zip(bunch.filenames, bunch.images)}


@pytest.fixture(scope="module")
def samples(photos) -> list[Sample]:
    """Four digits (grey PNG) and two photos (one PNG, one JPEG), sorted as every listing orders them."""
    digits = load_digits()
    items = [Sample(f"digit-{index}", str(digits.target[index]), "png",
                    encode(Image.fromarray((digits.images[index] * 255 / 16).astype(np.uint8), "L")))
             for index in range(4)]
    items.append(Sample("china", "photo", "jpg", encode(photos["china"], "JPEG", quality=90)))
    items.append(Sample("flower", "photo", "png", encode(photos["flower"])))
    return sorted(items, key=lambda sample: f"{sample.label}/{sample.key}.{sample.extension}")


# Builders: the same samples as each kind of input; each returns the spec to list.

def build_folder(root, samples: list[Sample]) -> str:
    for sample in samples:
        write(root / "images" / sample.label / f"{sample.key}.{sample.extension}", sample.data)
    return str(root / "images")


def build_manifest(root, samples: list[Sample]) -> str:
    for sample in samples:
        write(root / "files" / sample.label / f"{sample.key}.{sample.extension}", sample.data)
    pd.DataFrame({"uri": [f"files/{s.label}/{s.key}.{s.extension}" for s in samples],
                  "label": [s.label for s in samples]}).to_csv(root / "manifest.csv", index=False)
    return str(root / "manifest.csv")


def build_parquet(root, samples: list[Sample]) -> str:
    os.makedirs(root / "parquet")
    half = len(samples) // 2
    for part, chunk in enumerate((samples[:half], samples[half:])):
        table = pa.table({"image": pa.array([s.data for s in chunk], pa.binary()),
                          "label": [s.label for s in chunk]})
        pq.write_table(table, root / "parquet" / f"part-{part}.parquet", row_group_size=2)
    return str(root / "parquet")


def build_webdataset(root, samples: list[Sample]) -> str:
    half = len(samples) // 2
    for part, chunk in enumerate((samples[:half], samples[half:])):
        members = []
        for s in chunk:
            members += [(f"{s.key}.{s.extension}", s.data), (f"{s.key}.cls", s.label.encode())]
        write_shard(root / "shards" / f"shard-{part:03d}.tar", members)
    return str(root / "shards" / "shard-{000..001}.tar")


BUILDERS = {"folder": build_folder, "manifest": build_manifest, "parquet": build_parquet,
            "webdataset": build_webdataset}


def test_every_registered_kind_has_a_builder():
    assert set(BUILDERS) == set(SOURCES)


@pytest.mark.parametrize("kind", BUILDERS)
def test_kind_is_detected_and_lists_every_sample_with_its_label(kind, tmp_path, samples):
    spec = BUILDERS[kind](tmp_path, samples)
    assert detect_kind(spec) == kind
    table = list_inputs(spec)
    assert table.schema.equals(LISTING_SCHEMA)
    assert table.column("label").to_pylist() == [s.label for s in samples]
    assert set(table.column("source").to_pylist()) == {kind}
    assert table.column("error_stage").null_count == table.num_rows


@pytest.mark.parametrize("kind", BUILDERS)
def test_ids_are_stable_across_listings_and_copies(kind, tmp_path, samples):
    spec = BUILDERS[kind](tmp_path / "original", samples)
    first = list_inputs(spec)
    assert list_inputs(spec).equals(first)
    shutil.copytree(tmp_path / "original", tmp_path / "elsewhere" / "copy")
    copied = list_inputs(spec.replace(str(tmp_path / "original"), str(tmp_path / "elsewhere" / "copy")))
    assert copied.column("image_id").equals(first.column("image_id"))
    assert not set(copied.column("uri").to_pylist()) & set(first.column("uri").to_pylist())


def test_id_rules_per_kind(tmp_path, samples):
    ids = {kind: list_inputs(build(tmp_path / kind, samples)).column("image_id").to_pylist()
           for kind, build in BUILDERS.items()}
    first = samples[0]
    assert ids["folder"][0] == f"{first.label}/{first.key}.{first.extension}"
    assert ids["manifest"][0] == f"files/{first.label}/{first.key}.{first.extension}"
    assert ids["parquet"][0] == "part-0.parquet#0"
    assert ids["webdataset"][0] == f"shard-000.tar#{first.key}"


def test_same_image_gives_identical_pixels_through_every_kind(tmp_path, samples):
    expected = np.stack([preprocess(Image.open(io.BytesIO(s.data)), 24, **UNIT) for s in samples])
    for kind, build in BUILDERS.items():
        batch = load(list_inputs(build(tmp_path / kind, samples)), size=24)
        assert batch["ok"].all(), (kind, batch["error_message"])
        np.testing.assert_array_equal(batch["pixels"], expected, err_msg=kind)


def test_folder_skips_hidden_and_non_image_files_and_labels_by_first_subfolder(tmp_path, samples):
    png = samples[0].data
    for name in ("cat/a.png", "cat/nested/deep/b.PNG", "dog/c.jpeg", "root.png", ".hidden.png",
                 ".cache/d.png", "cat/.e.png", "notes.txt", "dog/readme"):
        write(tmp_path / name, png)
    table = list_inputs(tmp_path)
    assert table.column("image_id").to_pylist() == ["cat/a.png", "cat/nested/deep/b.PNG", "dog/c.jpeg", "root.png"]
    assert table.column("label").to_pylist() == ["cat", "cat", "dog", None]
    assert table.column("uri").to_pylist()[0] == str(tmp_path / "cat" / "a.png")


def test_manifest_resolves_dedupes_and_reports_bad_uris(tmp_path, samples):
    png = samples[0].data
    write(tmp_path / "data" / "a.png", png)
    outside = write(tmp_path / "elsewhere" / "b.png", png)
    rows = [("a.png", "x"), ("./a.png", "y"), (outside, "z"), (f"file://{outside}", "z"),
            ("missing/none.png", "x"), ("", "x"), ("http://host/c.png", "x"), ("http://host/c.png", "x")]
    pd.DataFrame(rows, columns=["uri", "label"]).to_csv(tmp_path / "data" / "list.csv", index=False)
    table = list_inputs(tmp_path / "data" / "list.csv")
    assert table.column("image_id").to_pylist() == ["a.png", outside, "missing/none.png", "list.csv#5",
                                                    "http://host/c.png"]
    assert table.column("label").to_pylist()[0] == "x"  # a repeated uri keeps its first row
    assert table.column("error_type").to_pylist() == [None, None, None, "invalid_uri", "invalid_uri"]
    batch = load(table)
    assert outcomes(batch) == {"a.png": None, outside: None, "missing/none.png": ("read", "missing"),
                               "list.csv#5": ("list", "invalid_uri"), "http://host/c.png": ("list", "invalid_uri")}


def test_parquet_manifest_with_an_id_column(tmp_path, samples):
    write(tmp_path / "img" / "a.png", samples[0].data)
    write(tmp_path / "img" / "b.png", samples[1].data)
    pq.write_table(pa.table({"uri": ["img/a.png", "img/b.png"], "id": ["007", None], "label": [3, None]}),
                   tmp_path / "m.parquet")
    assert detect_kind(str(tmp_path / "m.parquet")) == "manifest"
    table = list_inputs(tmp_path / "m.parquet")
    assert table.column("image_id").to_pylist() == ["007", "img/b.png"]  # an empty id cell falls back to the uri
    assert table.column("label").to_pylist() == ["3", None]


def test_repeated_ids_for_different_inputs_are_refused(tmp_path, samples):
    write(tmp_path / "a.png", samples[0].data)
    write(tmp_path / "b.png", samples[1].data)
    pd.DataFrame({"uri": ["a.png", "b.png"], "image_id": ["same", "same"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="'same' names 2 different inputs"):
        list_inputs(tmp_path / "m.csv")


def test_parquet_with_huggingface_struct_and_class_names(tmp_path, samples, monkeypatch):
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["zero", "one", "two", "three"]}}
    table = pa.table({"image": pa.array([{"bytes": s.data, "path": f"{s.key}.png"} for s in samples[:4]]),
                      "label": pa.array([0, 1, 2, 3], pa.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=1)
    listing = list_inputs(tmp_path / "train.parquet")
    assert listing.column("label").to_pylist() == ["zero", "one", "two", "three"]
    assert listing.column("image_id").to_pylist() == [f"train.parquet#{row}" for row in range(4)]
    assert listing.column("uri").to_pylist()[1] == f"{tmp_path / 'train.parquet'}#1"

    opened = []
    real = pq.ParquetFile
    monkeypatch.setattr(files.pq, "ParquetFile", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    shuffled = listing.take([3, 0, 2])  # rows out of order, from three of the four row groups
    batch = load(shuffled)
    assert len(opened) == 1
    expected = np.stack([preprocess(Image.open(io.BytesIO(samples[i].data)), SIZE, **UNIT) for i in (3, 0, 2)])
    np.testing.assert_array_equal(batch["pixels"], expected)


def test_parquet_image_column_detection_and_id_column(tmp_path, samples):
    table = pa.table({"id": ["p", "q"], "jpg": pa.array([samples[0].data, samples[1].data], pa.binary()),
                      "caption": pa.array([b"x", b"y"], pa.binary())})
    pq.write_table(table, tmp_path / "images.parquet")
    listing = list_inputs(tmp_path / "images.parquet")
    assert listing.column("member").to_pylist() == ["jpg", "jpg"]
    assert listing.column("image_id").to_pylist() == ["p", "q"]
    assert listing.column("label").to_pylist() == [None, None]
    assert load(listing)["ok"].all()

    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"])}), tmp_path / "ambiguous.parquet")
    with pytest.raises(ValueError, match="image_column="):
        list_inputs(tmp_path / "ambiguous.parquet", kind="parquet")
    with pytest.raises(ValueError, match="no image-bytes column id"):
        list_inputs(tmp_path / "images.parquet", image_column="id")
    chosen = list_inputs(tmp_path / "ambiguous.parquet", kind="parquet", image_column="b")
    assert chosen.column("member").to_pylist() == ["b"]


def test_webdataset_groups_members_by_key_and_reads_labels(tmp_path, samples, monkeypatch):
    png, jpg = samples[0].data, samples[4].data
    write_shard(tmp_path / "wds" / "a-0.tar", [
        ("s1.jpg", jpg), ("s1.cls", b"7\n"),
        ("dir/s2.png", png), ("dir/s2.seg.png", png), ("dir/s2.txt", b"cat"),
        ("s3.cls", b"1"),                      # no image member
        ("._s4.png", png), ("dir/.s6.png", png)])  # hidden (macOS resource forks): skipped
    webp = encode(Image.open(io.BytesIO(png)), "WEBP", lossless=True)
    write_shard(tmp_path / "wds" / "a-1.tar", [("s5.webp", webp), ("s5.label", b"dog")])
    listing = list_inputs(tmp_path / "wds" / "a-{0..1}.tar")
    assert listing.column("image_id").to_pylist() == ["a-0.tar#s1", "a-0.tar#dir/s2", "a-0.tar#s3", "a-1.tar#s5"]
    assert listing.column("label").to_pylist() == ["7", "cat", "1", "dog"]
    assert listing.column("member").to_pylist() == ["s1.jpg", "dir/s2.png", "", "s5.webp"]
    for spec in (tmp_path / "wds", tmp_path / "wds" / "a-*.tar"):
        assert list_inputs(spec).equals(listing)

    opened = []
    real = open
    monkeypatch.setattr(files, "open", lambda path, *a: opened.append(path) or real(path, *a), raising=False)
    batch = load(listing)
    assert sorted(opened) == [str(tmp_path / "wds" / "a-0.tar"), str(tmp_path / "wds" / "a-1.tar")]
    assert outcomes(batch) == {"a-0.tar#s1": None, "a-0.tar#dir/s2": None,
                               "a-0.tar#s3": ("list", "no_image_member"), "a-1.tar#s5": None}


def test_detection_and_kind_override(tmp_path, samples):
    write(tmp_path / "mixed" / "a.png", samples[0].data)
    pq.write_table(pa.table({"image": pa.array([samples[1].data], pa.binary())}), tmp_path / "mixed" / "b.parquet")
    assert detect_kind(str(tmp_path / "mixed")) == "folder"
    assert list_inputs(tmp_path / "mixed").column("image_id").to_pylist() == ["a.png"]
    assert list_inputs(tmp_path / "mixed", kind="parquet").column("image_id").to_pylist() == ["b.parquet#0"]
    with pytest.raises(KeyError, match="folder, manifest, parquet, webdataset"):
        list_inputs(tmp_path / "mixed", kind="zip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(tmp_path / "nowhere")
    write(tmp_path / "empty" / "notes.txt", b"hello")
    with pytest.raises(ValueError, match="no image files"):
        list_inputs(tmp_path / "empty")
    write_shard(tmp_path / "shard-001.tar", [("a.png", samples[0].data)])
    with pytest.raises(FileNotFoundError, match="shard-002.tar"):
        list_inputs(tmp_path / "shard-{001..002}.tar")


def _gradient16() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1)))


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (SIZE, SIZE), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, SIZE // 2, SIZE))  # left half blue (index 1), right half red (index 0)
    if transparent:
        image.info["transparency"] = 1
    return image


# mode -> (encoded image, check of the (3, S, S) pixels in [0, 1])
MODES = {
    "L": (lambda: encode(Image.new("L", (SIZE, SIZE), 128)),
          lambda p: np.allclose(p, 128 / 255)),
    "I;16": (lambda: encode(_gradient16()),
             lambda p: np.all(np.diff(p[0, 0]) > 0) and np.allclose(p[0], p[2]) and p[0, 0, -1] == 1.0),
    "P": (lambda: encode(_palette(False)),
          lambda p: np.allclose(p[:, 0, 0], [0, 0, 1]) and np.allclose(p[:, 0, -1], [1, 0, 0])),
    "P+transparency": (lambda: encode(_palette(True)),
                       lambda p: np.allclose(p[:, 0, 0], [1, 1, 1]) and np.allclose(p[:, 0, -1], [1, 0, 0])),
    "RGBA": (lambda: encode(Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 0))),
             lambda p: np.allclose(p, 1.0)),
    "RGBA half": (lambda: encode(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 128))),
                  lambda p: np.allclose(p, 127 / 255, atol=1 / 255)),
    "LA": (lambda: encode(Image.new("LA", (SIZE, SIZE), (0, 0))),
           lambda p: np.allclose(p, 1.0)),
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)), "JPEG"),
                  lambda p: p[0].mean() > 0.9 and p[1:].mean() < 0.1),
    "1": (lambda: encode(Image.fromarray(np.indices((SIZE, SIZE)).sum(0) % 2 == 0)),
          lambda p: set(np.unique(p)) == {0.0, 1.0} and p[0, 0, 0] == 1.0),
    "I;16 TIFF": (lambda: encode(_gradient16(), "TIFF"),
                  lambda p: np.all(np.diff(p[0, 0]) > 0)),
}


@pytest.mark.parametrize("mode", MODES)
def test_unusual_modes_decode_to_sensible_rgb(mode, tmp_path):
    make, check = MODES[mode]
    write(tmp_path / "img" / "x.png", make())
    batch = load(list_inputs(tmp_path / "img"))
    assert batch["ok"].all(), batch["error_message"]
    assert check(batch["pixels"][0]), batch["pixels"][0][:, 0]


def test_bad_inputs_each_give_one_error_row_while_good_rows_pass(tmp_path, samples):
    png = samples[1].data
    jpg = samples[4].data
    corpus = {
        "good.png": (png, None),
        "good.jpg": (jpg, None),
        "zero.png": (b"", ("read", "empty")),
        "truncated.png": (png[: len(png) * 2 // 3], ("decode", "truncated")),
        "truncated.jpg": (jpg[: len(jpg) // 2], ("decode", "truncated")),
        "text.png": (b"this is a text file, not a picture\n", ("decode", "not_an_image")),
        "bomb.png": (png_claiming(100_000, 100_000), ("decode", "decompression_bomb")),
    }
    for name, (content, _) in corpus.items():
        write(tmp_path / "set" / name, content)
    os.makedirs(tmp_path / "set" / "folder.png")  # a directory where a manifest expects a file
    uris = sorted(corpus) + ["gone.png", "folder.png"]
    pd.DataFrame({"uri": uris}).to_csv(tmp_path / "set" / "manifest.csv", index=False)
    batch = load(list_inputs(tmp_path / "set" / "manifest.csv"))
    expected = {name: outcome for name, (_, outcome) in corpus.items()}
    expected.update({"gone.png": ("read", "missing"), "folder.png": ("read", "unreadable")})
    assert outcomes(batch) == expected
    assert set(batch["error_type"]) - {None} <= set(ERROR_TYPES)

    good, errors = split_errors(batch)
    assert sorted(good["image_id"]) == ["good.jpg", "good.png"]
    assert good["pixels"].shape == (2, 3, SIZE, SIZE) and np.abs(good["pixels"]).sum(axis=(1, 2, 3)).all()
    assert "error_type" not in good and "ok" not in good
    assert tuple(errors) == ERROR_COLUMNS and len(errors["image_id"]) == len(uris) - 2
    assert all(isinstance(message, str) and message for message in errors["error_message"])
    assert not np.abs(batch["pixels"][~batch["ok"]]).any()


@pytest.mark.parametrize("size, outcome", [(12, ("decode", "decompression_bomb")),   # 144 px: PIL's warning
                                           (15, ("decode", "decompression_bomb")),   # 225 px: PIL's error
                                           (10, None)])
def test_pixel_limit_is_configurable_and_restored(size, outcome, tmp_path):
    write(tmp_path / "img" / "x.png", encode(Image.new("RGB", (size, size), "white")))
    before = Image.MAX_IMAGE_PIXELS
    batch = load(list_inputs(tmp_path / "img"), max_pixels=100)
    assert outcomes(batch) == {"x.png": outcome}
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, samples):
    path = write(tmp_path / "img" / "locked.png", samples[0].data)
    os.chmod(path, 0)
    try:
        assert outcomes(load(list_inputs(tmp_path / "img"))) == {"locked.png": ("read", "unreadable")}
    finally:
        os.chmod(path, 0o644)


def test_bad_parquet_cells(tmp_path, samples):
    cells = [samples[0].data, None, b"", b"not an image"]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), tmp_path / "cells.parquet")
    batch = load(list_inputs(tmp_path / "cells.parquet"))
    assert list(outcomes(batch).values()) == [None, ("read", "empty"), ("read", "empty"), ("decode", "not_an_image")]


def test_bad_tar_members_and_shards(tmp_path, samples):
    png = samples[0].data
    shard = write_shard(tmp_path / "a.tar", [("ok.png", png), ("zero.png", b""), ("last.png", png)])
    listing = list_inputs(shard)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as handle:  # cut the shard inside its last member, after listing
        handle.truncate(listing.column("offset")[2].as_py() + 10)
    assert list(outcomes(load(listing)).values()) == [None, ("read", "empty"), ("read", "truncated")]
    assert size > os.path.getsize(shard)
    os.remove(shard)
    assert set(outcomes(load(listing)).values()) == {("read", "missing")}

    write(tmp_path / "gz" / "b.tar", zlib.compress(png))  # not a tar at all
    assert outcomes(load(list_inputs(tmp_path / "gz" / "b.tar"))) == {"b.tar": ("list", "unreadable")}


def test_error_row_has_the_errors_table_columns():
    row = error_row("id", "/data/x.png", None, "list", "invalid_uri", "empty uri")
    assert tuple(row) == ERROR_COLUMNS and row["error_stage"] == "list"
