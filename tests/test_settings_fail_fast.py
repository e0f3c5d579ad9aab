"""A bad setting, in a job's YAML or on the command line, stops the command within seconds, before
Ray starts and before anything is written, with a message that names the key."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# (dotted key, bad value as YAML): a misspelt key and each invalid value the config checks
BAD = [
    ("analysis.score_metrc", "smape"),
    ("analysis.score_metric", "smap"),
    ("analysis.composite", "epsilon-gama-box"),
    ("analysis.deconv_mode", "mean"),
    ("analysis.target", "truth"),
    ("analysis.ks", "[]"),
    ("analysis.ks", "[4, 1]"),
    ("analysis.heatmap_size", "0"),
    ("batch_size", "-1"),
    ("shard_size", "0"),
    ("image_size", "abc"),
    ("bach_size", "8"),
]


# runs a command in a fresh interpreter and reports, after it stopped, whether torch or Ray were
# ever imported: a refusal that comes before either loads is a refusal before Ray starts, and it
# takes the interpreter's start-up and YAML only (under a second here; not asserted: timing
# asserts flake on a loaded 2-core machine)
PROBE = """
import json, runpy, sys
argv = json.loads(sys.argv[1])
sys.argv = argv
code = 0
try:
    if argv[0] == "lrpscale":
        from lrpscale.cli import main
        code = main(argv[1:])
    else:
        sys.path.insert(0, str(__import__("pathlib").Path(argv[0]).parent))
        runpy.run_path(argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (print(stop.code, file=sys.stderr) or 1)
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "ray") if m in sys.modules)}))
"""


def _run(argv: list[str], cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    return {**outcome, "stderr": result.stderr}


def _assert_refused(outcome: dict, key: str, output: Path) -> None:
    assert outcome["code"] != 0
    assert key in outcome["stderr"], outcome["stderr"]  # the message names the key
    assert outcome["loaded"] == [], "refused only after loading torch or Ray"
    assert not output.exists(), "nothing may be written"
    assert "Traceback" not in outcome["stderr"]


@pytest.mark.parametrize("key, value", BAD)
def test_command_line_refuses_a_bad_setting(tmp_path, key, value):
    output = tmp_path / "run"
    outcome = _run(["lrpscale", "run", "--input", str(tmp_path), "--output", str(output), "--weights", "demo",
                    "--set", f"{key}={value}"], tmp_path)
    assert outcome["code"] == 2
    _assert_refused(outcome, key, output)


@pytest.mark.parametrize("key, value", BAD)
def test_job_refuses_a_bad_setting_in_its_yaml(tmp_path, key, value):
    config = yaml.safe_load((ROOT / "jobs" / "configs" / "audit.yaml").read_text())
    output = tmp_path / "run"
    config.update(input=str(tmp_path), output=str(output), weights="demo")
    *parents, leaf = key.split(".")
    section = config
    for parent in parents:
        section = section.setdefault(parent, {})
    section[leaf] = yaml.safe_load(value)
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    _assert_refused(_run([str(ROOT / "jobs" / "audit.py"), "--config", str(path)], tmp_path), key, output)


def test_named_options_are_checked_the_same_way(tmp_path):
    output = tmp_path / "run"
    for option, value, key in (("--ks", "4,1", "analysis.ks"), ("--composite", "lrp", "analysis.composite"),
                               ("--heatmap-size", "0", "analysis.heatmap_size"), ("--batch-size", "0", "batch_size")):
        outcome = _run(["lrpscale", "run", "--input", str(tmp_path), "--output", str(output), option, value], tmp_path)
        _assert_refused(outcome, key, output)
