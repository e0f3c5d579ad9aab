"""End-to-end audits on a local Ray: every input kind, bad inputs, exactly-once resume, the reducer."""
from __future__ import annotations

import os
import shutil
import signal
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lrpscale.config import AnalysisConfig, RunConfig
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.inputs import decoding, sources
from lrpscale.results import open_run
from lrpscale.results.reducer import reduce_run
from lrpscale.run.actor import AnalyzerActor
from lrpscale.run.audit import run_audit
from tests.helpers.audits import session_processes, wait_for_commits, write_sources
from tests.helpers.exactly_once import assert_exactly_once

pytestmark = pytest.mark.slow
ALL_TABLES = ("images", "neurons", "scores", "edges", "deconv", "errors")


def _config(source, output, weights, **kwargs) -> RunConfig:
    return RunConfig(input=str(source), output=str(output), model="vgg11", weights=str(weights), image_size=32,
                     shard_size=16, batch_size=8, **kwargs)


def test_folder_audit_matches_in_process_analysis(ray_session, digits_folder, tiny_weights, tmp_path):
    summary = run_audit(_config(digits_folder, tmp_path / "run", tiny_weights))
    listing = sources.list_inputs(digits_folder)
    assert summary.images == listing.num_rows == 120 and summary.ok == 120 and summary.errors == 0
    assert_exactly_once(tmp_path / "run", set(listing.column("image_id").to_pylist()))

    run = open_run(tmp_path / "run")
    model = load_model("vgg11", tiny_weights)
    mean, std = input_normalization(model)
    chosen = listing.slice(0, 5)
    batch = decoding.load_batch({c: chosen.column(c).to_numpy(zero_copy_only=False) for c in chosen.column_names},
                            32, mean, std)
    analysis = Analyzer(model, AnalysisConfig())(torch.from_numpy(batch["pixels"]))
    for n, image_id in enumerate(chosen.column("image_id").to_pylist()):
        stored = run.heatmap(image_id)
        expected = analysis.heatmap_small[n].numpy()
        assert np.allclose(stored, expected, atol=2e-3 * np.abs(expected).max())
        row = run.images.set_index("image_id").loc[image_id]
        assert row.pred == int(analysis.logits[n].argmax())
        chosen_k = run.scores[(run.scores.image_id == image_id) & run.scores.chosen & (run.scores.variant == "fidelity")]
        sweep = next(iter(analysis.sweeps.values()))
        assert int(chosen_k.k.iloc[0]) == int(sweep.chosen_k[n])
    info = run.info
    assert info["status"] == "complete" and info["images"] == 120 and info["model_id"].startswith("vgg11:")
    assert set(info["versions"]) >= {"lrpscale", "torch", "ray"}
    heat = pq.read_table(tmp_path / "run" / "images").schema.field("heatmap").type
    assert heat.shape == [32, 32]

    # a finished run is not analysed again
    again = run_audit(_config(digits_folder, tmp_path / "run", tiny_weights))
    assert again.already_complete and again.analysed_now == 0
    with pytest.raises(RuntimeError, match="another model"):
        run_audit(_config(digits_folder, tmp_path / "run", tiny_weights, analysis=AnalysisConfig(ks=(1, 2))))


def test_every_input_kind_gives_the_same_results(ray_session, digits_folder, tiny_weights, tmp_path):
    specs = write_sources(digits_folder, tmp_path)
    heatmaps = {}
    for kind, spec in specs.items():
        summary = run_audit(_config(spec, tmp_path / kind, tiny_weights))
        assert summary.ok == 20 and summary.errors == 0, kind
        run = open_run(tmp_path / kind)
        assert_exactly_once(tmp_path / kind, set(sources.list_inputs(spec).column("image_id").to_pylist()))
        # the file stem identifies an image in every kind: the id's last component
        stems = run.images.image_id.str.split(r"[#/]").str[-1].str.replace(".png", "", regex=False)
        frame = run.images.assign(stem=stems).sort_values("stem")
        heatmaps[kind] = run.heatmaps(frame)
        assert sorted(run.images.label) == sorted(p.parent.name for p in sorted(digits_folder.rglob("*.png"))[:20])
    # same images, same order (by file stem in every kind) -> same heatmaps
    assert np.allclose(heatmaps["manifest"], heatmaps["parquet"], atol=1e-6)
    assert np.allclose(heatmaps["parquet"], heatmaps["webdataset"], atol=1e-6)


def _bad_corpus(root: Path, digits_folder: Path) -> set[str]:
    good = sorted(digits_folder.rglob("*.png"))[:30]
    for p in good:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("this is not an image")
    (bad / "truncated.png").write_bytes(good[0].read_bytes()[:60])
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(bad / "cmyk.jpg")
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16)).save(bad / "sixteen.png")
    Image.new("P", (16, 16), 3).save(bad / "palette.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(bad / "alpha.png")
    Image.new("L", (16, 16), 200).save(bad / "gray.png")
    # a PNG whose header claims 50000 x 50000 pixels: a decompression bomb
    header = bytearray(good[0].read_bytes())
    header[16:24] = (50000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")  # IHDR's checksum must still hold
    (bad / "bomb.png").write_bytes(bytes(header))
    return {"bad/empty.png", "bad/text.png", "bad/truncated.png", "bad/bomb.png"}


def test_bad_inputs_become_error_rows(ray_session, digits_folder, tiny_weights, tmp_path):
    failing = _bad_corpus(tmp_path / "corpus", digits_folder)
    summary = run_audit(_config(tmp_path / "corpus", tmp_path / "run", tiny_weights))
    run = open_run(tmp_path / "run")
    assert set(run.errors.image_id) == failing
    assert summary.errors == len(failing) and summary.ok == summary.images - len(failing)
    assert {"bad/cmyk.jpg", "bad/sixteen.png", "bad/palette.png", "bad/alpha.png", "bad/gray.png"} <= set(
        run.images.image_id)
    by_id = run.errors.set_index("image_id")
    assert by_id.loc["bad/empty.png", "error_type"] == "empty"
    assert by_id.loc["bad/text.png", "error_type"] == "not_an_image"
    assert by_id.loc["bad/bomb.png", "error_type"] == "decompression_bomb"
    assert set(by_id.stage) <= {"read", "decode"}

    # a manifest row that points nowhere
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"uri": [str(p) for p in sorted(digits_folder.rglob("*.png"))[:3]] + [str(tmp_path / "gone.png")]}
                 ).to_csv(manifest, index=False)
    run_audit(_config(manifest, tmp_path / "run-m", tiny_weights))
    errors = open_run(tmp_path / "run-m").errors
    assert list(errors.error_type) == ["missing"]


def test_actor_failure_inside_a_batch_becomes_an_error_row(tiny_weights, digits_folder):
    """The actor class alone (no cluster): an image the analysis cannot take fails alone."""
    actor = AnalyzerActor("vgg11", str(tiny_weights), AnalysisConfig(target="label").to_dict())
    listing = sources.list_inputs(digits_folder).slice(0, 4)
    columns = {c: listing.column(c).to_numpy(zero_copy_only=False) for c in listing.column_names}
    batch = decoding.load_batch(columns, 32, (0.5,) * 3, (0.5,) * 3)
    batch["shard"] = np.zeros(4, np.int32)
    batch["label"] = batch["label"].copy()
    batch["label"][2] = "not-a-class"  # target="label" cannot explain an unknown class
    result = actor(batch).to_pylist()
    assert [r["error_stage"] for r in result] == [None, None, "analyze", None]
    assert all(r["target"] == int(r["label"]) for r in result if r["error_stage"] is None)
    assert "label" in result[2]["error_message"]


def test_driver_killed_mid_run_resumes_exactly_once(ray_session, digits_folder, tiny_weights, tmp_path, child_run):
    address = ray_session.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    child = child_run(run_dir, digits_folder, tiny_weights, address)
    wait_for_commits(run_dir, 3, child)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    committed_before = len(list((run_dir / "_commits").glob("*.json")))
    assert committed_before < 15, "the run finished before it could be killed"
    summary = run_audit(RunConfig(input=str(digits_folder), output=str(run_dir), model="vgg11",
                                  weights=str(tiny_weights), image_size=32, shard_size=8, batch_size=4))
    assert summary.analysed_now <= 120 - 8 * committed_before
    assert_exactly_once(run_dir, set(sources.list_inputs(digits_folder).column("image_id").to_pylist()))


def test_actor_killed_mid_run_still_gives_every_image_once(ray_session, digits_folder, tiny_weights, tmp_path,
                                                          child_run):
    address = ray_session.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    child = child_run(run_dir, digits_folder, tiny_weights, address)
    wait_for_commits(run_dir, 2, child)
    actors = session_processes(ray_session, "AnalyzerActor")
    assert actors, "no analyser actor found"
    os.kill(actors[0], signal.SIGKILL)
    assert child.wait(timeout=300) == 0
    assert_exactly_once(run_dir, set(sources.list_inputs(digits_folder).column("image_id").to_pylist()))


def test_actors_that_keep_dying_stop_the_run_with_a_clear_error_and_it_resumes(ray_session, digits_folder, tiny_weights,
                                                                               tmp_path, monkeypatch):
    """Every analyser actor is killed as soon as it appears: Ray restarts them without limit, so
    the run must notice that nothing gets committed and stop (here after 2 s without a commit
    instead of 10 min), keeping what was committed; once the actors live, the same command
    finishes the run exactly once."""
    import threading

    from lrpscale.run import audit

    monkeypatch.setattr(audit, "STALL_SECONDS", 2.0)
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            for pid in session_processes(ray_session, "AnalyzerActor"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stop.wait(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    config = _config(digits_folder, tmp_path / "run", tiny_weights)
    try:
        with pytest.raises(RuntimeError, match=r"actors died \d+ times .* without committing a shard.*resume"):
            run_audit(config)
    finally:
        stop.set()
        thread.join()
    summary = run_audit(config)
    assert summary.ok == 120
    assert_exactly_once(tmp_path / "run", set(sources.list_inputs(digits_folder).column("image_id").to_pylist()))


def test_reducer_heatmaps_equal_pandas_means(ray_session, digits_folder, tiny_weights, tmp_path):
    run_audit(_config(digits_folder, tmp_path / "run", tiny_weights))
    reduce_run(tmp_path / "run")
    run = open_run(tmp_path / "run")
    images = run.images
    maps = np.stack([np.asarray(h, np.float32) for h in images.heatmap])
    maps /= np.abs(maps).sum(1, keepdims=True)
    for label, group in images.groupby("label"):
        expected = maps[group.index].mean(0).reshape(32, 32)
        assert np.allclose(run.class_heatmap(label), expected, atol=1e-6)
    nodes = run.class_nodes
    frequency = nodes[(nodes.by == "pred")].groupby("class").frequency.max()
    assert (frequency <= 1.0).all()
    # neuron frequencies recomputed with pandas from the neurons table
    neurons = run.neurons
    counts = neurons.groupby(["label", "layer", "neuron"]).size()
    sizes = images.groupby("label").size()
    mine = nodes[nodes.by == "label"].set_index(["class", "layer", "neuron"]).frequency
    for (label, layer, neuron), count in counts.items():
        assert mine.loc[(label, layer, neuron)] == pytest.approx(count / sizes[label])
    graph = run.class_graph(images.label.iloc[0])
    assert graph.number_of_nodes() > 0


def test_local_ray_listens_on_loopback_only(ray_session):
    """The local Ray the pipeline starts (and this session's, started the same way) binds 127.0.0.1."""
    import psutil

    session = ray_session._private.worker._global_node.get_session_dir_path()
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(session in part for part in p.info["cmdline"] or ())]
    assert roots, "found no process of this Ray session"
    processes = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    processes[os.getpid()] = psutil.Process()
    listening = set()
    for process in processes.values():
        try:
            listening |= {c.laddr.ip for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
