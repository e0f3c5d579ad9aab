"""Audits with their inputs and their run on a real S3 endpoint on loopback (moto's server, reached
only through the standard AWS environment): the same tables as on local disk for every input kind,
exactly once after a killed driver or a killed actor, the commands that take a run, re-analysis of
a bucket that grew, and bad storage refused before Ray starts."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lrpscale import cli
from lrpscale.config import RunConfig
from lrpscale.inputs import sources
from lrpscale.results import open_run
from lrpscale.run.audit import run_audit
from lrpscale.run.reanalysis import reanalyze
from lrpscale.storage.store import RunStore
from tests.helpers.audits import session_processes, wait_for_commits, write_sources
from tests.helpers.exactly_once import assert_exactly_once

pytestmark = pytest.mark.slow


def _config(source: str, output: str, weights, **kwargs) -> RunConfig:
    return RunConfig(input=str(source), output=str(output), model="vgg11", weights=str(weights), image_size=32,
                     shard_size=8, batch_size=4, **kwargs)


def _ids(spec: str) -> set[str]:
    return set(sources.list_inputs(spec).column("image_id").to_pylist())


def _stem_frame(run):
    """The run's images by file stem (the id's last part), the key shared by every input kind."""
    stems = run.images.image_id.str.split(r"[#/]").str[-1].str.replace(".png", "", regex=False)
    return run.images.assign(stem=stems).sort_values("stem").reset_index(drop=True)


@pytest.fixture(scope="module")
def data(s3_server, digits_folder, tmp_path_factory):
    """The digits as each input kind, on local disk and uploaded to s3://data/."""
    root = tmp_path_factory.mktemp("sources")
    local = {"folder": str(digits_folder), **write_sources(digits_folder, root)}
    s3_server.bucket("data")
    s3_server.bucket("runs")
    s3_server.upload(digits_folder, "s3://data/digits")
    # the manifest in the bucket names its images relative to itself, as a copied dataset does
    files = sorted(digits_folder.rglob("*.png"))[:20]
    lines = ["uri,label"] + [f"digits/{p.relative_to(digits_folder)},{p.parent.name}" for p in files]
    s3_server.put("s3://data/manifest.csv", ("\n".join(lines) + "\n").encode())
    s3_server.upload(root / "images.parquet", "s3://data/images.parquet")
    s3_server.upload(root / "shards", "s3://data/shards")
    remote = {"folder": "s3://data/digits", "manifest": "s3://data/manifest.csv",
              "parquet": "s3://data/images.parquet", "webdataset": "s3://data/shards/part-*.tar"}
    return {"local": local, "remote": remote}


def test_every_input_kind_in_s3_gives_the_tables_of_the_same_data_on_disk(ray_session, data, tiny_weights, tmp_path):
    for kind in ("folder", "manifest", "parquet", "webdataset"):
        remote_run = f"s3://runs/kinds/{kind}"
        summary = run_audit(_config(data["remote"][kind], remote_run, tiny_weights), progress=False)
        run_audit(_config(data["local"][kind], tmp_path / kind, tiny_weights), progress=False)
        local, remote = open_run(tmp_path / kind), open_run(remote_run)
        assert summary.output == remote_run and summary.errors == 0
        assert_exactly_once(remote_run, _ids(data["remote"][kind]))
        mine, theirs = _stem_frame(remote), _stem_frame(local)
        assert mine.stem.tolist() == theirs.stem.tolist(), kind
        assert (mine.label.tolist(), mine.pred.tolist()) == (theirs.label.tolist(), theirs.pred.tolist()), kind
        np.testing.assert_allclose(remote.heatmaps(mine), local.heatmaps(theirs), atol=1e-6, err_msg=kind)
        if kind != "manifest":  # the local manifest names absolute paths, the bucket's relative ones
            assert sorted(remote.images.image_id) == sorted(local.images.image_id), kind


def _plain_and_open_run(location: str, expected: set[str]) -> None:
    """Exactly once read plainly (pandas/pyarrow on the table folders) and through open_run."""
    assert_exactly_once(location, expected)
    run = open_run(location)
    ids = list(run.images.image_id) + list(run.errors.image_id)
    assert sorted(ids) == sorted(expected)
    assert pq.read_table(f"{location}/images").num_rows == len(run.images)


def test_a_driver_killed_mid_run_on_s3_resumes_exactly_once(ray_session, data, tiny_weights, child_run):
    location = "s3://runs/killed-driver"
    config = _config(data["remote"]["folder"], location, tiny_weights)
    child = child_run(location, config.input, tiny_weights, ray_session.get_runtime_context().gcs_address)
    wait_for_commits(location, 3, child)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    committed = len(RunStore(location).committed())
    assert committed < 15, "the run finished before it could be killed"
    summary = run_audit(config, progress=False)
    assert summary.analysed_now <= 120 - 8 * committed
    _plain_and_open_run(location, _ids(data["remote"]["folder"]))


def test_an_actor_killed_mid_run_on_s3_still_gives_every_image_once(ray_session, data, tiny_weights, child_run):
    location = "s3://runs/killed-actor"
    child = child_run(location, data["remote"]["folder"], tiny_weights, ray_session.get_runtime_context().gcs_address)
    wait_for_commits(location, 2, child)
    actors = session_processes(ray_session, "AnalyzerActor")
    assert actors, "no analyser actor found"
    os.kill(actors[0], signal.SIGKILL)
    assert child.wait(timeout=300) == 0
    _plain_and_open_run(location, _ids(data["remote"]["folder"]))
    filesystem, path = pafs.FileSystem.from_uri(f"{location}/images")
    files = filesystem.get_file_info(pafs.FileSelector(path))
    assert len(files) == len(RunStore(location).committed())  # the killed attempt's files are gone


def test_reduce_compare_and_report_work_on_s3_runs(ray_session, s3_server, data, tiny_weights, capsys):
    first, second = "s3://runs/cmd-a", "s3://runs/cmd-b"
    weights = s3_server.upload(tiny_weights, "s3://data/models/tiny.pth")  # --weights from the bucket too
    run_audit(_config(data["remote"]["manifest"], first, weights), progress=False)
    run_audit(_config(data["remote"]["manifest"], second, tiny_weights, analysis=_other_analysis()), progress=False)
    assert open_run(first).info["model_id"] == open_run(second).info["model_id"]  # the same weights' checksum
    assert cli.main(["reduce", first, "--no-strategies"]) == 0
    assert open_run(first).is_reduced and len(open_run(first).class_heatmaps)
    assert cli.main(["compare", first, second]) == 0
    assert "classes" in capsys.readouterr().out
    assert RunStore(f"{second}/compare-cmd-a").is_file("summary.json")  # in the bucket, beside run B
    assert not Path("s3:").exists()  # never a local folder named after the URI
    assert cli.main(["report", second, "--compare", first]) == 0
    page = RunStore(second).read_bytes("report.html").decode()
    assert 'id="comparison"' in page and "data:image/png;base64," in page
    # the inputs live in the bucket: the report reads them through the store to show them
    assert 'alt="input ' in page and "input not readable here" not in page


def _other_analysis():
    from lrpscale.config import AnalysisConfig

    return AnalysisConfig(composite="epsilon-plus-flat")


def test_reanalysis_picks_up_images_added_to_the_bucket(ray_session, s3_server, digits_folder, tiny_weights):
    s3_server.bucket("growing")
    files = sorted(digits_folder.rglob("*.png"))
    for path in files[:16]:
        s3_server.put(f"s3://growing/in/{path.relative_to(digits_folder)}", path.read_bytes())
    config = _config("s3://growing/in", "s3://growing/unused", tiny_weights)
    first = reanalyze(config, "s3://growing/runs", progress=False)
    assert first.action == "new-run" and first.summary.analysed_now == 16
    for path in files[16:24]:
        s3_server.put(f"s3://growing/in/{path.relative_to(digits_folder)}", path.read_bytes())
    second = reanalyze(config, "s3://growing/runs", progress=False)
    assert second.action == "new-images" and second.run == first.run and second.summary.analysed_now == 8
    _plain_and_open_run(second.run, _ids("s3://growing/in"))


@pytest.mark.parametrize("case", ["no bucket", "wrong credentials", "no images", "not a run"])
def test_bad_storage_fails_before_ray_with_a_clear_message(s3_server, data, tiny_weights, case, monkeypatch):
    """Each refused before Ray is asked for (a start would fail the test) and nothing is written."""
    monkeypatch.setattr("lrpscale.run.audit.ensure_ray",
                        lambda *a, **k: pytest.fail("Ray was started for a run that should have been refused"))
    source, output = data["remote"]["folder"], "s3://runs/refused"
    if case == "no bucket":
        output, expected = "s3://no-such-bucket/run", "bucket 'no-such-bucket' does not exist"
    elif case == "no images":
        s3_server.put("s3://data/empty/readme.txt", b"no images here")
        source, expected = "s3://data/empty", "no image"
    elif case == "not a run":
        s3_server.put("s3://runs/other/notes.txt", b"a user's file")
        output, expected = "s3://runs/other", "not empty and holds no lrpscale run"
    else:
        expected = "access denied"
    with pytest.raises(ValueError, match=expected) as raised:
        if case == "wrong credentials":
            with s3_server.refusing_credentials():
                run_audit(_config(source, output, tiny_weights), progress=False)
        else:
            run_audit(_config(source, output, tiny_weights), progress=False)
    assert "s3://" in str(raised.value)
    assert not RunStore("s3://runs/refused").is_run()
    if case == "not a run":
        assert RunStore("s3://runs/other").is_file("notes.txt")  # the user's file stays
