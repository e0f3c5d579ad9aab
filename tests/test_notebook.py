"""notebooks/audit.ipynb runs top to bottom against the demo runs (the venv's Python as its kernel)
and shows the answers a pandas recomputation from the run's tables gives."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "audit.ipynb"
KERNEL = "lrpscale-test-python"
# appended to the executed copy: the notebook's answers as JSON, to compare with the test's own
ANSWERS = """import json
print(json.dumps({"accuracy": accuracy["accuracy"].to_dict(), "worst": worst.image_id.tolist(),
                  "relied_on": {c: [int(n) for n in v] for c, v in relied_on.items()},
                  "compared": comparison.summary["run_a"]}))"""


def test_notebook_is_committed_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(demo_runs, tmp_path_factory):
    """The notebook executed with LRPSCALE_RUN and LRPSCALE_COMPARE_RUN set; cells by tag."""
    import nbformat
    from nbclient import NotebookClient

    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lrpscale tests", "language": "python"}))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(ANSWERS, metadata={"tags": ["answers"]}))
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this environment
        patch.setenv("JUPYTER_PATH", str(jupyter))
        patch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
        patch.setenv("LRPSCALE_RUN", str(demo_runs["run"]))
        patch.setenv("LRPSCALE_COMPARE_RUN", str(demo_runs["other"]))
        NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}


def _text(cell) -> str:
    return "\n".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in cell.outputs)


def _pngs(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def test_notebook_answers_the_auditors_questions(executed, demo_runs):
    run = demo_runs["run"]
    answers = json.loads(_text(executed["answers"]))
    images = pd.read_parquet(run / "images")

    accuracy = (images.pred_label == images.label).groupby(images.label).mean()
    assert answers["accuracy"] == pytest.approx(accuracy.to_dict())
    assert accuracy.min() < 1  # the demo runs hold misclassified images, so the check has teeth
    shown = {}  # the displayed table: "label  images  accuracy" rows
    for line in _text(executed["accuracy"]).splitlines():
        if re.fullmatch(r"\S+\s+\d+\s+[\d.]+", line.strip()):
            label, _, value = line.split()
            shown[label] = float(value)
    assert shown == pytest.approx(accuracy.to_dict(), abs=1e-6)

    scores = pd.read_parquet(run / "scores", filters=[("chosen", "==", True), ("variant", "==", "fidelity")])
    assert answers["worst"] == scores.nlargest(10, "smape").image_id.tolist()
    assert all(image_id in _text(executed["worst"]) for image_id in answers["worst"])

    layer = scores.layer.iloc[0]
    neurons = pd.read_parquet(run / "neurons", filters=[("layer", "==", layer)])
    for label, group in neurons.groupby("label"):
        counts = group.groupby("neuron").size()
        top = sorted(counts.index, key=lambda n: (-counts[n], n))[:5]
        assert answers["relied_on"][label] == top
    assert "most often selected neurons of conv5_3" in _text(executed["neurons"])

    assert _pngs(executed["class-heatmaps"]) == 1 and _pngs(executed["class-graphs"]) == 3
    other = json.loads((demo_runs["other"] / "run.json").read_text())
    assert answers["compared"] == other["run_id"]
    assert f"run {other['run_id']}" in _text(executed["comparison"]) and _pngs(executed["comparison"]) == 1
