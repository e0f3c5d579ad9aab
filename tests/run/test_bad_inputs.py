"""What a skeptical new user tries: every input accounted for, and nothing of the user's lost."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lrpscale.config import AnalysisConfig, RunConfig
from lrpscale.engine.models import build_vgg
from lrpscale.results import open_run
from lrpscale.run.audit import run_audit
from lrpscale.storage.store import RunStore

pytestmark = pytest.mark.slow


def _config(source, output, weights, **kwargs) -> RunConfig:
    return RunConfig(input=str(source), output=str(output), model="vgg11", weights=str(weights), image_size=32,
                     shard_size=16, batch_size=8, **kwargs)


def test_output_inside_or_equal_to_input_is_refused_and_nothing_is_written(digits_folder, tiny_weights, tmp_path):
    source = tmp_path / "images"
    shutil.copytree(digits_folder, source)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    for output in (source, source / "run", source / "0" / "run"):
        with pytest.raises(ValueError, match="inside --input"):
            run_audit(_config(source, output, tiny_weights))
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


def test_a_folder_of_other_files_or_a_file_is_refused_as_output(digits_folder, tiny_weights, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("my own work")
    with pytest.raises(ValueError, match="holds no lrpscale run"):
        run_audit(_config(digits_folder, output, tiny_weights))
    assert sorted(p.name for p in output.iterdir()) == ["thesis.tex"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_audit(_config(digits_folder, tmp_path / "a-file", tiny_weights))


def test_overwrite_replaces_only_the_run(ray_session, digits_folder, tiny_weights, tmp_path):
    output = tmp_path / "run"
    run_audit(_config(digits_folder, output, tiny_weights), progress=False)
    (output / "notes.txt").write_text("the user's own notes")
    (output / "figures").mkdir()
    (output / "figures" / "keep.png").write_bytes(b"not ours")

    torch.manual_seed(3)
    other = tmp_path / "other.pth"
    torch.save(build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).state_dict(), other)
    with pytest.raises(RuntimeError, match="another model"):
        run_audit(_config(digits_folder, output, other), progress=False)
    summary = run_audit(_config(digits_folder, output, other), overwrite=True, progress=False)

    assert summary.ok == 120 and summary.analysed_now == 120
    assert (output / "notes.txt").read_text() == "the user's own notes"
    assert (output / "figures" / "keep.png").read_bytes() == b"not ours"
    assert sorted(p.name for p in digits_folder.iterdir()) == [str(d) for d in range(10)]


# --- problems found before Ray starts -------------------------------------------------------------

REFUSAL = """
import json, sys
from lrpscale.config import RunConfig
from lrpscale.results import open_run
from lrpscale.run.audit import run_audit
try:
    run_audit(RunConfig.from_mapping(json.loads(sys.argv[1])), progress=False)
    error = None
except (ValueError, RuntimeError) as caught:
    error = str(caught)
print(json.dumps({"error": error, "ray": "ray" in sys.modules and sys.modules["ray"].is_initialized()}))
"""


def _refused_before_ray(config: RunConfig, match: str) -> None:
    """run_audit, in a fresh process, refuses ``config`` with a message matching ``match``,
    without starting Ray and without writing anything."""
    result = subprocess.run([sys.executable, "-c", REFUSAL, json.dumps(config.to_dict())], capture_output=True,
                            text=True, timeout=300)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None and re.search(match, outcome["error"]), outcome
    assert outcome["ray"] is False
    assert not Path(config.output).exists()


def test_target_label_without_labels_is_refused_before_ray(digits_folder, tiny_weights, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(digits_folder.rglob("*.png"))[:5]:
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    config = _config(flat, tmp_path / "run", tiny_weights, analysis=AnalysisConfig(target="label"))
    _refused_before_ray(config, "no labels .*class subfolders.*--target pred")


def test_target_label_with_labels_that_are_not_classes_names_them(digits_folder, tiny_weights, tmp_path):
    source = tmp_path / "animals"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        shutil.copy(next(digits_folder.rglob("*.png")), source / name / "a.png")
    config = _config(source, tmp_path / "run", tiny_weights, analysis=AnalysisConfig(target="label"))
    _refused_before_ray(config, r"none of the input's labels \('cat', 'dog'\) is a class of the model \('0', '1'")


def test_an_unknown_layer_is_refused_before_ray(digits_folder, tiny_weights, tmp_path):
    config = _config(digits_folder, tmp_path / "run", tiny_weights, analysis=AnalysisConfig(sweep_layers=("conv9_9",)))
    _refused_before_ray(config, "unknown layer 'conv9_9'; this model has: conv1_1")


def test_weights_errors_say_what_the_file_is(tmp_path):
    from lrpscale.engine.models import WeightsError, load_model

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="is not a torch weights file") as caught:
        load_model("vgg16", str(text))
    assert "pickled" not in str(caught.value) and "these are" not in str(caught.value)
    torch.manual_seed(0)
    vgg11 = tmp_path / "vgg11.pth"
    torch.save(build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).state_dict(), vgg11)
    with pytest.raises(WeightsError, match=r"holds 8 conv layers \(vgg11\); this model has 13: pass --model vgg11$"):
        load_model("vgg16", str(vgg11))


# --- runs that went wrong -----------------------------------------------------------------------------

def test_a_run_that_committed_nothing_restarts_with_a_corrected_configuration(ray_session, digits_folder,
                                                                               tiny_weights, tmp_path):
    output = tmp_path / "run"
    store = RunStore(output)
    # what a run that failed before its first commit leaves: its listing and run.json at "running"
    store.write_listing(pa.table({"image_id": ["x"], "shard": pa.array([0], pa.int32())}))
    store.write_json({"run_id": "old", "fingerprint": {"model_id": "another"}, "status": "running"})
    summary = run_audit(_config(digits_folder, output, tiny_weights), progress=False)
    assert summary.ok == 120 and summary.errors == 0
    assert RunStore(output).read_json()["status"] == "complete"


@pytest.fixture(scope="module")
def finished_run(ray_session, digits_folder, tiny_weights, tmp_path_factory):
    output = tmp_path_factory.mktemp("finished") / "run"
    run_audit(_config(digits_folder, output, tiny_weights), progress=False)
    return output


def _half(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run whose last shards lost their commit markers (as after a crash)."""
    half = tmp_path / "half"
    shutil.copytree(run, half)
    markers = sorted((half / "_commits").glob("part-*.json"))
    for marker in markers[len(markers) // 2:]:
        marker.unlink()
    info = json.loads((half / "run.json").read_text())
    (half / "run.json").write_text(json.dumps({**info, "status": "running"}))
    return half


def test_compare_states_completeness_and_one_sided_classes(finished_run, tmp_path):
    from lrpscale.results import open_run
    from lrpscale.results.comparison import compare_runs

    half = _half(finished_run, tmp_path)
    comparison = compare_runs(half, finished_run)
    s = comparison.summary
    assert s["complete_a"] is False and s["complete_b"] is True
    assert s["completeness_a"] == "incomplete, 4 of 8 shards"
    assert any("A: run" in w and "incomplete: 4 of 8 shards committed" in w for w in s["warnings"])
    # the half run holds only the first shards' classes: the others are "B only", not overlap 0
    labels_half = set(open_run(half).images.label)
    only_b = comparison.classes[comparison.classes.present == "B only"]
    assert set(only_b["class"]) == set(map(str, range(10))) - labels_half
    assert only_b.node_jaccard.isna().all()
    both = comparison.classes[comparison.classes.present == "both"]
    assert set(both["class"]) == labels_half
    assert "warning: A: run" in comparison.text()


def test_compare_refuses_runs_without_a_shared_class_and_warns_on_architectures(finished_run, tmp_path):
    from lrpscale.results.comparison import compare_runs

    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    info = json.loads((other / "run.json").read_text())
    info["config"]["model"] = "vgg13"
    (other / "run.json").write_text(json.dumps(info))
    comparison = compare_runs(finished_run, other)
    assert any("different architectures (vgg11 vs vgg13)" in w for w in comparison.summary["warnings"])
    assert comparison.classes.node_jaccard.isna().all()

    renamed = tmp_path / "renamed"
    shutil.copytree(finished_run, renamed)
    shutil.rmtree(renamed / "classes", ignore_errors=True)
    for path in (renamed / "images").glob("*.parquet"):
        table = pq.read_table(path)
        labels = pa.array([f"x{label}" for label in table.column("label").to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), path)
    with pytest.raises(ValueError, match="the runs share no class: A has '0', '1'.*B has 'x0'"):
        compare_runs(finished_run, renamed)


def test_reduce_and_report_of_a_half_run_say_so(finished_run, tmp_path):
    half = _half(finished_run, tmp_path)
    for argv in (["reduce", str(half), "--no-pictures"], ["report", str(half)]):
        result = subprocess.run([sys.executable, "-m", "lrpscale.cli", *argv], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert "warning: run" in result.stderr and "incomplete: 4 of 8 shards committed" in result.stderr
    page = (half / "report.html").read_text()
    assert 'class="warning"' in page and "incomplete: 4 of 8 shards committed" in page


def test_ctrl_c_ends_cleanly_with_exit_130(digits_folder, tiny_weights, tmp_path):
    """SIGINT while the audit runs: one line, exit code 130, no traceback; the same command resumes.
    Shards of 2 images, so that most of the run is still to do when the first commit appears (with
    shards of 16 the run once finished before the signal arrived)."""
    output = tmp_path / "run"
    command = [sys.executable, "-m", "lrpscale.cli", "run", "--input", str(digits_folder), "--output", str(output),
               "--model", "vgg11", "--weights", str(tiny_weights), "--image-size", "32", "--shard-size", "2",
               "--batch-size", "2", "--no-reduce"]
    # a Ctrl-C as in a terminal: a shell starts background commands (`make test &`, a CI runner's
    # script) with SIGINT ignored, and the child would inherit that and never see the signal
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (output / "_commits").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: run the same command to resume" in err and "Traceback" not in err


# --- every listed input ends once in images or errors, through a whole run -----------------------------

def _tables(output: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = open_run(output)
    return run.images, run.errors


def test_odd_entries_in_a_folder_each_end_once_in_images_or_errors(ray_session, digits_folder, tiny_weights, tmp_path):
    """A FIFO named .png, a name in Latin-1 bytes, a symlinked class folder, a link out of the
    folder, a link to a text file and an empty file, among 20 digits: the run finishes, and each
    entry is one row of images or of errors, with a message that says what happened."""
    source = tmp_path / "images"
    digits = sorted(digits_folder.rglob("*.png"))
    for cls in "01234":  # 4 digits in each of 5 class folders
        (source / cls).mkdir(parents=True)
        for path in sorted((digits_folder / cls).glob("*.png"))[:4]:
            shutil.copy(path, source / cls / path.name)
    os.mkfifo(source / "0" / "pipe.png")
    with open(os.path.join(os.fsencode(source), b"1", b"caf\xe9.png"), "wb") as file:
        file.write(digits[30].read_bytes())
    elsewhere = tmp_path / "elsewhere" / "7"
    elsewhere.mkdir(parents=True)
    shutil.copy(digits[40], elsewhere / "kept.png")
    (source / "linked").mkdir()
    os.symlink(source / "2", source / "linked" / "2")            # inside the root: followed
    os.symlink(elsewhere, source / "7")                          # out of the root: an error row
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.symlink(secret, source / "3" / "passwd.png")
    (source / "4" / "empty.png").write_bytes(b"")

    summary = run_audit(_config(source, tmp_path / "run", tiny_weights), progress=False)
    images, errors = _tables(tmp_path / "run")
    twice_through_link = len(list((source / "2").glob("*.png")))
    assert summary.images == 20 + 1 + twice_through_link + 4
    assert summary.ok == len(images) == 20 + 1 + twice_through_link
    assert summary.errors == len(errors) == 4
    assert sorted(images.image_id) == sorted(set(images.image_id))
    assert "1/caf%E9.png" in set(images.image_id)
    assert {f"linked/2/{p.name}" for p in (source / "2").glob("*.png")} <= set(images.image_id)
    by_id = errors.set_index("image_id")
    assert by_id.loc["0/pipe.png", "error_type"] == "not_a_file"
    assert by_id.loc["7", "error_type"] == "outside_root"
    assert "--follow-external-links" in by_id.loc["7", "message"]
    assert by_id.loc["3/passwd.png", "error_type"] == "outside_root"
    assert by_id.loc["4/empty.png", "error_type"] == "empty"
    assert not errors.message.str.contains("root:x").any()


def test_a_text_file_named_png_is_an_error_without_its_contents(ray_session, tiny_weights, tmp_path):
    source = tmp_path / "images" / "0"
    source.mkdir(parents=True)
    (source / "notes.png").write_text("root:x:0:0:r and other private text\n")
    (source / "ok.png").write_bytes(_digit_png())
    summary = run_audit(_config(source.parent, tmp_path / "run", tiny_weights), progress=False)
    _, errors = _tables(tmp_path / "run")
    assert (summary.ok, summary.errors) == (1, 1)
    message = errors.message.iloc[0]
    assert errors.error_type.iloc[0] == "not_an_image" and "looks like text" in message
    assert "root" not in message and "private" not in message


def test_a_truncated_shard_keeps_its_intact_samples(ray_session, tiny_weights, tmp_path):
    shard = tmp_path / "shards" / "train-0.tar"
    shard.parent.mkdir()
    png = _digit_png()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for key in ("s0", "s1", "s2"):
            for name, data in ((f"{key}.png", png), (f"{key}.cls", b"3")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("s3.png")
        link.type, link.linkname = tarfile.LNKTYPE, "s0.png"
        tar.addfile(link)
    with tarfile.open(shard) as tar:
        cut = tar.getmember("s2.png").offset_data + 10
    os.truncate(shard, cut)
    summary = run_audit(_config(str(shard), tmp_path / "run", tiny_weights), progress=False)
    images, errors = _tables(tmp_path / "run")
    assert (summary.ok, summary.errors) == (2, 1)
    assert sorted(images.image_id) == ["train-0.tar#s0", "train-0.tar#s1"]
    assert errors.image_id.tolist() == ["train-0.tar#s2"] and errors.error_type.tolist() == ["truncated"]
    assert "ends inside member s2.png" in errors.message.iloc[0]


def test_a_hard_link_in_a_shard_is_read_as_its_target(ray_session, tiny_weights, tmp_path):
    shard = tmp_path / "train-0.tar"
    png = _digit_png()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a.png")
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.LNKTYPE, "a.png"
        tar.addfile(link)
    summary = run_audit(_config(str(shard), tmp_path / "run", tiny_weights), progress=False)
    images, _ = _tables(tmp_path / "run")
    assert (summary.ok, summary.errors) == (2, 0)
    first, second = (open_run(tmp_path / "run").heatmap(i) for i in ("train-0.tar#a", "train-0.tar#b"))
    np.testing.assert_array_equal(first, second)


def test_an_unwritable_output_is_refused(digits_folder, tiny_weights, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the permission check cannot refuse it")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ValueError, match="permission denied"):
        run_audit(_config(digits_folder, locked / "run", tiny_weights), progress=False)


def _digit_png() -> bytes:
    from sklearn.datasets import load_digits

    buffer = io.BytesIO()
    Image.fromarray((load_digits().images[0] * 16).astype(np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()
