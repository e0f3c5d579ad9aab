"""The run store: commits and the exactly-once rule (a shard's files count only once its marker
exists), what a run owns and may delete, where a run may be written, atomic writes, run.json,
and locations given as local paths or ``file://`` URIs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lrpscale.storage.store import RunStore, resolve


def shard_tables(*ids: str) -> dict[str, pa.Table]:
    """The tables of one shard: an images and an errors table naming the given images."""
    return {"images": pa.table({"image_id": list(ids)}), "errors": pa.table({"image_id": pa.array([], pa.string())})}


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_store_of_a_local_folder_is_rooted_at_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = RunStore("runs/a")
    assert isinstance(store.fs, pafs.LocalFileSystem)
    assert store.root == str(tmp_path / "runs" / "a")
    assert store.path("images", "part-00000.parquet") == f"{tmp_path}/runs/a/images/part-00000.parquet"


# --- commits and exactly once -----------------------------------------------------------------


def only(folder: Path) -> Path:
    """The one file in a folder."""
    files = list(folder.iterdir())
    assert len(files) == 1, files
    return files[0]


def test_commit_writes_each_table_of_the_shard_and_a_marker_naming_the_files(tmp_path):
    store = RunStore(tmp_path / "run")
    store.commit(3, shard_tables("a", "b"), rows=2, nodes=["node-b", "node-a"])
    images = only(tmp_path / "run" / "images")
    assert images.name.startswith("part-00003-") and images.suffix == ".parquet"
    assert pq.read_table(images).column("image_id").to_pylist() == ["a", "b"]
    marker_file = only(tmp_path / "run" / "_commits")
    attempt = images.name[len("part-00003-"):-len(".parquet")]
    assert marker_file.name == f"part-00003-{attempt}.json"
    marker = json.loads(marker_file.read_text())
    assert marker["files"] == {"images": f"images/{images.name}", "errors": f"errors/part-00003-{attempt}.parquet"}
    assert {key: marker[key] for key in ("shard", "attempt", "rows", "nodes")} == {
        "shard": 3, "attempt": attempt, "rows": 2, "nodes": ["node-a", "node-b"]}
    assert store.commits() == {3: attempt}


def test_committed_is_empty_for_a_new_run(tmp_path):
    assert RunStore(tmp_path / "run").committed() == set()


def test_committed_lists_the_shards_with_a_marker(tmp_path):
    store = RunStore(tmp_path / "run")
    for shard in (0, 2, 11):
        store.commit(shard, shard_tables(f"image-{shard}"), rows=1)
    assert store.committed() == {0, 2, 11}


def test_files_of_an_attempt_without_its_marker_are_not_committed(tmp_path):
    """Files an actor wrote before it was killed, or before the driver died: they must stay
    invisible, or a resumed run would count their images twice; the same shard's committed
    attempt is what readers see."""
    store = RunStore(tmp_path / "run")
    store.commit(0, shard_tables("a"), rows=1)
    committed = store.committed_files("images")
    store.write_shard(0, "0badc0ffee00", shard_tables("a"))       # a retried attempt of shard 0
    store.write_shard(1, "1badc0ffee00", shard_tables("b"))       # shard 1, never committed
    assert store.committed() == {0}
    assert store.committed_files("images") == committed and len(committed) == 1
    assert store.committed_rows("images") == 1


def test_runs_written_before_attempts_were_named_still_read(tmp_path):
    """part-NNNNN.json markers commit part-NNNNN.parquet files."""
    store = RunStore(tmp_path / "run")
    store.write_parquet("images/part-00000.parquet", pa.table({"image_id": ["a"]}))
    store.write_parquet("images/part-00001.parquet", pa.table({"image_id": ["b"]}))
    store.write_bytes("_commits/part-00000.json", b"{}")
    assert store.commits() == {0: None}
    assert store.committed_files("images") == [store.path("images", "part-00000.parquet")]


def test_committed_files_are_sorted_parquet_files_only(tmp_path):
    store = RunStore(tmp_path / "run")
    for shard in (10, 2, 0):
        store.commit(shard, shard_tables(f"image-{shard}"), rows=1)
    (tmp_path / "run" / "images" / ".part-00003.parquet.tmp").write_bytes(b"half a file")
    (tmp_path / "run" / "images" / "notes.txt").write_text("a user's note")
    files = store.committed_files("images")
    assert [Path(f).name[:10] for f in files] == ["part-00000", "part-00002", "part-00010"]
    assert files == sorted(files)


def test_committed_files_of_a_table_never_written_are_none(tmp_path):
    store = RunStore(tmp_path / "run")
    store.commit(0, shard_tables("a"), rows=1)
    assert store.committed_files("neurons") == []


def test_committed_rows_sum_the_committed_files(tmp_path):
    store = RunStore(tmp_path / "run")
    store.commit(0, shard_tables("a", "b", "c"), rows=3)
    store.commit(1, shard_tables("d"), rows=1)
    assert store.committed_rows("images") == 4


def test_discard_uncommitted_leaves_only_the_committed_files_in_every_table(tmp_path):
    store = RunStore(tmp_path / "run")
    store.commit(0, shard_tables("a"), rows=1)
    kept = {table: names(tmp_path / "run" / table) for table in ("images", "errors")}
    for table in ("images", "errors"):
        store.write_shard(1, "aaaaaaaaaaaa", {table: pa.table({"image_id": ["b"]})})
        store.write_shard(0, "bbbbbbbbbbbb", {table: pa.table({"image_id": ["a"]})})
        (tmp_path / "run" / table / ".part-00002-cccccccccccc.parquet.tmp").write_bytes(b"half")
    assert store.discard_uncommitted() == 6
    assert {table: names(tmp_path / "run" / table) for table in ("images", "errors")} == kept
    assert store.committed() == {0}


def test_discard_uncommitted_of_a_clean_run_changes_nothing(tmp_path):
    store = RunStore(tmp_path / "run")
    store.commit(0, shard_tables("a"), rows=1)
    before = store.committed_files("images")
    assert store.discard_uncommitted() == 0
    assert store.committed_files("images") == before


# --- what a run is and owns -------------------------------------------------------------------


def test_a_missing_or_empty_folder_is_not_a_run(tmp_path):
    assert not RunStore(tmp_path / "missing").is_run()
    assert not RunStore(tmp_path).is_run()


def test_a_folder_with_run_json_is_a_run(tmp_path):
    store = RunStore(tmp_path)
    store.write_json({"run_id": "r"})
    assert store.is_run()


def test_a_folder_with_only_a_listing_is_a_run(tmp_path):
    """A run interrupted before its first run.json: its listing is already frozen."""
    store = RunStore(tmp_path)
    store.write_listing(pa.table({"image_id": ["a"]}))
    assert store.is_run()


@pytest.fixture
def run_with_a_users_file(tmp_path) -> RunStore:
    """A run with every kind of entry lrpscale writes, and a user's file and folder beside them."""
    store = RunStore(tmp_path / "run")
    store.write_listing(pa.table({"image_id": ["a"]}))
    store.write_json({"run_id": "r"})
    store.commit(0, shard_tables("a"), rows=1)
    store.write_bytes("classes/summary.json", b"{}")
    store.write_bytes("compare-abc/summary.md", b"# a comparison")
    store.write_bytes("report.html", b"<html></html>")
    (tmp_path / "run" / ".run.json.tmp").write_text("{")  # an interrupted write
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / ".hidden").write_text("mine too")  # hidden, but no .tmp of lrpscale's
    (tmp_path / "run" / "figures").mkdir()
    return store


def test_owned_lists_every_entry_lrpscale_wrote_and_nothing_else(run_with_a_users_file):
    owned = [entry.base_name for entry in run_with_a_users_file.owned()]
    assert owned == sorted([".run.json.tmp", "_commits", "_listing.parquet", "classes", "compare-abc", "errors", "images",
                            "report.html", "run.json"])


def test_remove_deletes_the_run_and_keeps_the_users_files(run_with_a_users_file, tmp_path):
    run_with_a_users_file.remove()
    assert names(tmp_path / "run") == [".hidden", "figures", "notes.txt"]
    assert not run_with_a_users_file.is_run()


# --- where a run may be written ---------------------------------------------------------------


def test_check_location_accepts_a_new_folder(tmp_path):
    RunStore(tmp_path / "new").check_location(str(tmp_path / "images"))


def test_check_location_accepts_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    RunStore(tmp_path / "empty").check_location(str(tmp_path / "images"))


def test_check_location_accepts_an_existing_run(tmp_path):
    """Resuming writes into the run's own folder."""
    store = RunStore(tmp_path / "run")
    store.write_json({"run_id": "r"})
    store.check_location(str(tmp_path / "images"))


def test_check_location_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        RunStore(tmp_path / "out").check_location(str(tmp_path / "images"))


def test_check_location_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty and holds no lrpscale run"):
        RunStore(tmp_path / "out").check_location(str(tmp_path / "images"))


@pytest.mark.parametrize("output", ["images", "images/run", "images/a/b"])
def test_check_location_refuses_the_input_or_a_folder_inside_it(tmp_path, output):
    with pytest.raises(ValueError, match="lies inside --input"):
        RunStore(tmp_path / output).check_location(str(tmp_path / "images"))


def test_check_location_refuses_a_folder_inside_a_glob_input(tmp_path):
    """A glob or brace pattern's folder part is the input's folder."""
    with pytest.raises(ValueError, match="lies inside --input"):
        RunStore(tmp_path / "images" / "run").check_location(f"{tmp_path}/images/*.png")
    with pytest.raises(ValueError, match="lies inside --input"):
        RunStore(tmp_path / "images" / "run").check_location(f"{tmp_path}/images/{{a,b}}/*.png")


def test_check_location_accepts_a_sibling_whose_name_starts_like_the_input(tmp_path):
    RunStore(tmp_path / "images-run").check_location(str(tmp_path / "images"))


# --- atomic writes ----------------------------------------------------------------------------


def test_an_atomic_write_is_hidden_until_it_ends(tmp_path):
    store = RunStore(tmp_path)
    with store.open_atomic("tables/a.bin") as stream:
        stream.write(b"abc")
        assert names(tmp_path / "tables") == [".a.bin.tmp"]
    assert names(tmp_path / "tables") == ["a.bin"]
    assert store.read_bytes("tables/a.bin") == b"abc"


def test_a_write_that_fails_midway_leaves_no_file_and_no_temporary_file(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError, match="crash"), store.open_atomic("tables/a.bin") as stream:
        stream.write(b"half")
        raise RuntimeError("crash")
    assert names(tmp_path / "tables") == []


def test_a_failing_write_bytes_leaves_no_file_and_no_temporary_file(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(TypeError):
        store.write_bytes("blob.bin", None)
    assert names(tmp_path) == []


def test_a_failing_write_parquet_leaves_no_file_and_no_temporary_file(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(pa.ArrowException, match="compression"):
        store.write_parquet("images/part-00000.parquet", pa.table({"a": [1]}), compression="no-such-codec")
    assert names(tmp_path / "images") == []


def test_a_failing_overwrite_keeps_the_old_file(tmp_path):
    store = RunStore(tmp_path)
    store.write_bytes("run.json", b"old")
    with pytest.raises(TypeError):
        store.write_bytes("run.json", None)
    assert store.read_bytes("run.json") == b"old"
    assert names(tmp_path) == ["run.json"]


def test_write_parquet_round_trips_with_its_options(tmp_path):
    store = RunStore(tmp_path)
    table = pa.table({"image_id": ["a", "b"], "pred": pa.array([1, 2], pa.int32())})
    store.write_parquet("images/part-00000.parquet", table, compression="zstd")
    assert store.read_parquet("images/part-00000.parquet").equals(table)
    assert pq.ParquetFile(tmp_path / "images" / "part-00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"


# --- run.json ---------------------------------------------------------------------------------


def test_read_json_of_a_folder_without_run_json_is_none(tmp_path):
    assert RunStore(tmp_path).read_json() is None


def test_write_json_then_read_json_round_trips(tmp_path):
    store = RunStore(tmp_path)
    content = {"run_id": "r", "images": 3, "layers": {"features.28": "conv5_3"}, "ok": None}
    store.write_json(content)
    assert store.read_json() == content
    assert json.loads((tmp_path / "run.json").read_text()) == content


def test_write_json_writes_values_json_cannot_hold_as_text(tmp_path):
    store = RunStore(tmp_path)
    store.write_json({"input": Path("/data/images")})
    assert store.read_json() == {"input": "/data/images"}


def test_write_json_replaces_the_previous_run_json(tmp_path):
    store = RunStore(tmp_path)
    store.write_json({"status": "running"})
    store.write_json({"status": "complete"})
    assert store.read_json() == {"status": "complete"}


# --- locations ----------------------------------------------------------------------------------


def test_local_path_of_a_local_run_is_its_folder(tmp_path):
    assert RunStore(tmp_path / "run").local_path() == tmp_path / "run"


def test_local_path_of_a_run_on_another_filesystem_is_none():
    assert RunStore("mock:///runs/a").local_path() is None


def test_resolve_makes_a_local_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve(Path("runs") / "a")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == os.path.join(str(tmp_path), "runs", "a")


def test_resolve_a_file_uri_to_the_local_filesystem(tmp_path):
    fs, path = resolve(f"file://{tmp_path}/run")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/run"


def test_a_run_at_a_file_uri_is_the_run_at_its_path(tmp_path):
    by_uri = RunStore(f"file://{tmp_path}/run")
    by_uri.commit(0, shard_tables("a"), rows=1)
    by_path = RunStore(tmp_path / "run")
    assert by_path.committed() == {0}
    assert by_uri.local_path() == tmp_path / "run"
    assert by_uri.location == f"file://{tmp_path}/run"
