"""What a skeptical new user tries: every input accounted for, and nothing of the user's lost."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrpscale.config import AnalysisConfig, RunConfig
from lrpscale.engine.models import build_vgg
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
    """SIGINT while the audit runs: one line, exit code 130, no traceback; the same command resumes."""
    output = tmp_path / "run"
    command = [sys.executable, "-m", "lrpscale.cli", "run", "--input", str(digits_folder), "--output", str(output),
               "--model", "vgg11", "--weights", str(tiny_weights), "--image-size", "32", "--shard-size", "16",
               "--batch-size", "8", "--no-reduce"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (output / "_commits").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: run the same command to resume" in err and "Traceback" not in err
