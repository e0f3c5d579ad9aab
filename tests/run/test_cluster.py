"""Audits on a real multi-node cluster on loopback (tests/cluster.py): a head and two worker nodes,
each worker advertising one ``accel_slot`` that stands in for a GPU. The driver runs as
``lrpscale run --address ... --actor-resources ...``, the way a user submits to a GPU cluster with
``{"num_gpus": 1}``, so one analyser actor is scheduled per slot across the nodes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrpscale.inputs import sources
from tests.helpers.cluster import LoopbackCluster
from tests.helpers.exactly_once import assert_exactly_once

pytestmark = pytest.mark.slow
LRPSCALE = str(Path(sys.executable).with_name("lrpscale"))
SLOT = {"resources": {"accel_slot": 1}, "num_cpus": 1}
IMAGES = 1200
SHARD = 8  # small shards: the run lasts long enough (60 commits) to lose a node in the middle of it
RUN_TIMEOUT = 240  # seconds for one driver run; a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def cluster():
    """Head (driver and decoding only, no slot) and two worker nodes with one slot each."""
    with LoopbackCluster(head_cpus=1) as cluster:
        cluster.add_workers(2, num_cpus=2, resources={"accel_slot": 1})
        yield cluster


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """IMAGES of scikit-learn's digits as PNG files in class folders: enough work that a node can
    be lost while shards are still pending."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-cluster")
    digits = load_digits()
    for i in range(IMAGES):
        folder = root / str(digits.target[i])
        folder.mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def _start_run(cluster: LoopbackCluster, source: Path, run_dir: Path, weights: Path) -> subprocess.Popen:
    command = [LRPSCALE, "run", "--address", cluster.address, "--input", str(source), "--output", str(run_dir),
               "--model", "vgg11", "--weights", str(weights), "--image-size", "32", "--shard-size", str(SHARD),
               "--batch-size", "4", "--actor-resources", json.dumps(SLOT), "--no-reduce"]
    with run_dir.with_name(run_dir.name + ".log").open("ab") as log:
        return subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the driver did not finish within {timeout} s; its log ends:\n{_tail(log)}")
    finally:
        _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path, size: int = 4000) -> str:
    return log.read_text(errors="replace")[-size:] if log.is_file() else "(no log)"


def _markers(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "_commits").glob("part-*.json"))]


def _worked_on(markers: list[dict]) -> set[str]:
    return set().union(*(marker["nodes"] for marker in markers))


def _wait_until_both_workers_committed(cluster: LoopbackCluster, run_dir: Path, process: subprocess.Popen, log: Path,
                                       timeout: float = 120) -> None:
    wanted = {node.node_id for node in cluster.workers}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _worked_on(_markers(run_dir)) >= wanted:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before both worker nodes committed:\n{_tail(log)}")
        time.sleep(0.2)
    pytest.fail(f"not both worker nodes committed a shard within {timeout} s:\n{_tail(log)}")


def _image_ids(source: Path) -> set[str]:
    return set(sources.list_inputs(str(source)).column("image_id").to_pylist())


def test_one_analyser_per_slot_runs_on_each_worker_node(cluster, digits, tiny_weights, tmp_path):
    assert cluster.listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    assert _finish(_start_run(cluster, digits, run_dir, tiny_weights), log) == 0, _tail(log)
    assert_exactly_once(run_dir, _image_ids(digits))
    markers = _markers(run_dir)
    assert sum(m["rows"] for m in markers) == IMAGES
    # the head advertises no slot: every shard was analysed on worker nodes, and both took part
    assert _worked_on(markers) == {node.node_id for node in cluster.workers}


def test_worker_node_lost_mid_run_still_gives_every_image_once(cluster, digits, tiny_weights, tmp_path):
    """Both analysers are busy when one worker node is SIGKILLed. The lost actor's shards fail as
    unavailable and go to the survivor (Ray would restart the lost actor, but no slot is free),
    whose new attempts are committed; the same driver completes the run."""
    assert len(cluster.workers) == 2
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    driver = _start_run(cluster, digits, run_dir, tiny_weights)
    try:
        _wait_until_both_workers_committed(cluster, run_dir, driver, log)
        victim, survivor = cluster.workers
        cluster.kill_node(victim)
        killed = time.time()
        print(f"node lost after {len(_markers(run_dir))} of {IMAGES // SHARD} shards were committed")
        assert len(_markers(run_dir)) < IMAGES // SHARD, "the run finished before the node could be lost"
        code = _finish(driver, log)
    finally:
        _kill_group(driver)
    assert code == 0, f"the run did not survive the node loss:\n{_tail(log)}"
    assert_exactly_once(run_dir, _image_ids(digits))
    markers = _markers(run_dir)
    assert sum(m["rows"] for m in markers) == IMAGES
    assert survivor.node_id in _worked_on([m for m in markers if m["time"] > killed])
