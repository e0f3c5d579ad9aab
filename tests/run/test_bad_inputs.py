"""What a skeptical new user tries: every input accounted for, and nothing of the user's lost."""
from __future__ import annotations

import shutil

import pytest
import torch

from lrpscale.config import RunConfig
from lrpscale.engine.models import build_vgg
from lrpscale.run.audit import run_audit

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
