"""The jobs/ entry points submitted with ``ray job submit`` to a real Ray head on loopback.

A head started with ``ray start --head`` (tests/cluster.py) serves the jobs API on 127.0.0.1;
each job is submitted with the repository as its working directory, waited for until it
SUCCEEDED, and its outputs are checked from the files it wrote. The head is stopped at the end.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers.cluster import LoopbackCluster
from tests.helpers.digits import write_digits

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PYTHON = sys.executable  # the environment lrpscale is installed in (a deployment's image runs `python`)
JOB_TIMEOUT = 300  # s: a hang fails the test instead of holding CI


@pytest.fixture(scope="module")
def head():
    # one node: the job's driver, its decode tasks and its analyser actor share 6 logical CPUs
    with LoopbackCluster(head_cpus=6, dashboard=True) as cluster:
        yield cluster


def submit(cluster: LoopbackCluster, *entrypoint: str) -> str:
    """``ray job submit`` the entry point with the repository as working directory; wait for the
    job to end and return its logs. Fails the test unless the job SUCCEEDED."""
    job_id = f"lrpscale-test-{uuid.uuid4().hex[:12]}"
    command = [RAY, "job", "submit", f"--address={cluster.dashboard_url}", f"--submission-id={job_id}",
               f"--working-dir={REPO}", "--no-wait", "--", PYTHON, *entrypoint]
    submitted = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.time() + JOB_TIMEOUT
    while True:
        asked = subprocess.run([RAY, "job", "status", f"--address={cluster.dashboard_url}", job_id],
                               env=cluster.env, capture_output=True, text=True, timeout=60)
        status = _plain(asked.stdout + asked.stderr)
        ended = re.search(r"\b(succeeded|failed|stopped)\b", status.lower())
        state = ended.group(1).upper() if ended else None
        if state or time.time() > deadline:
            break
        time.sleep(2)
    logs = _plain(subprocess.run([RAY, "job", "logs", f"--address={cluster.dashboard_url}", job_id],
                                 env=cluster.env, capture_output=True, text=True, timeout=60).stdout)
    if state != "SUCCEEDED":
        subprocess.run([RAY, "job", "stop", f"--address={cluster.dashboard_url}", job_id], env=cluster.env,
                       capture_output=True, timeout=60)
    assert state == "SUCCEEDED", f"job {job_id} ended {state or 'not within the timeout'}:\n{status}\n{logs[-4000:]}"
    return logs


def _plain(text: str) -> str:
    """The CLI's output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_audit_then_reduce_jobs(head, tmp_path):
    ids = write_digits(tmp_path / "images", range(48))
    run = tmp_path / "run"
    logs = submit(head, "jobs/audit.py", "--config", "jobs/configs/audit.yaml", "--input", str(tmp_path / "images"),
                  "--output", str(run), "--weights", "demo", "--set", "image_size=32", "--set", "shard_size=16",
                  "--set", "pictures=false")
    assert f"{len(ids)} images, 0 errors" in logs
    images = pd.read_parquet(run / "images")
    assert set(images.image_id) == ids and images.image_id.is_unique
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["config"]["weights"] == "demo"
    assert (run / "report.html").is_file()
    classes = pd.read_parquet(run / "classes" / "summary_heatmaps.parquet")
    assert classes[classes.by == "label"].images.sum() == len(ids)

    (run / "classes" / "summary_heatmaps.parquet").unlink()
    submit(head, "jobs/reduce.py", "--config", "jobs/configs/reduce.yaml", "--run", str(run), "--set", "pictures=false")
    again = pd.read_parquet(run / "classes" / "summary_heatmaps.parquet")
    pd.testing.assert_frame_equal(again.drop(columns="heatmap"), classes.drop(columns="heatmap"))


def test_reanalyze_job_adds_only_new_images(head, tmp_path):
    images, root = tmp_path / "images", tmp_path / "runs"
    first = write_digits(images, range(32))
    arguments = ["jobs/reanalyze.py", "--config", "jobs/configs/reanalyze.yaml", "--input", str(images),
                 "--output-root", str(root), "--weights", "demo", "--set", "image_size=32", "--set", "shard_size=16",
                 "--set", "pictures=false", "--set", "report=false"]
    assert "new-run" in submit(head, *arguments)
    added = write_digits(images, range(32, 48))
    logs = submit(head, *arguments)
    assert "new-images" in logs and f"({len(added)} inputs analysed now" in logs
    (run,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    frame = pd.read_parquet(run / "images")
    assert set(frame.image_id) == first | added and frame.image_id.is_unique
