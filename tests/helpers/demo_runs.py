"""Audits of real digits with the bundled demo model, shared by the report, notebook and results tests."""
from __future__ import annotations

DEMO_RUN_IMAGES = 200  # the first 200 digits of the demo model's test split, about 20 per class
DEMO_RUN_BAD = {"0/empty.png": b"", "1/text.png": b"this is not an image"}


def build_demo_runs(root):
    """Two audits of the same digits with the bundled demo model, each reduced (tables only).

    ``root/images``: the first ``DEMO_RUN_IMAGES`` digits the demo model was not trained on (so
    some are misclassified) as PNG files in class folders, plus the ``DEMO_RUN_BAD`` files (an
    empty file and a text file named .png, which become error rows);
    ``root/run``: composite epsilon-gamma-box (the default); ``root/run-plus-flat``:
    epsilon-plus-flat. Needs a running Ray. Returns {"images", "run", "other"} as paths.
    """
    from pathlib import Path

    from PIL import Image

    from lrpscale.config import AnalysisConfig, RunConfig
    from lrpscale.demo_data import digits_arrays, digits_split
    from lrpscale.results.reducer import reduce_run
    from lrpscale.run.audit import run_audit

    root = Path(root)
    images, labels = digits_arrays()
    folder = root / "images"
    for index in digits_split()[1][:DEMO_RUN_IMAGES]:
        (folder / str(labels[index])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], "L").save(folder / str(labels[index]) / f"{index:04d}.png")
    for name, content in DEMO_RUN_BAD.items():
        (folder / name).write_bytes(content)
    runs = {"images": folder}
    for key, name, composite in (("run", "run", "epsilon-gamma-box"), ("other", "run-plus-flat", "epsilon-plus-flat")):
        output = root / name
        run_audit(RunConfig(input=str(folder), output=str(output), weights="demo", batch_size=32, shard_size=64,
                            analysis=AnalysisConfig(composite=composite)), progress=False)
        reduce_run(output)
        runs[key] = output
    return runs

