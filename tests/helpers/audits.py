"""Audits driven the way a user drives them, for the exactly-once tests on disk and on object
storage: the same digits as every input kind, a driver in a child process joining the test's Ray,
waiting for its commits, and finding the session's actor processes to kill."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrpscale.storage.store import RunStore


def write_sources(digits_folder: Path, root: Path) -> dict[str, str]:
    """The same 20 digits as a manifest, a Parquet bytes dataset and WebDataset shards."""
    files = sorted(p for p in digits_folder.rglob("*.png"))[:20]
    manifest = root / "manifest.csv"
    pd.DataFrame({"uri": [str(p) for p in files], "label": [p.parent.name for p in files]}).to_csv(manifest, index=False)
    pq.write_table(pa.table({"image": [p.read_bytes() for p in files], "label": [p.parent.name for p in files],
                             "image_id": [p.stem for p in files]}), root / "images.parquet")
    (root / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(root / "shards" / f"part-{shard}.tar", "w") as tar:
            for p in files[shard * 10:(shard + 1) * 10]:
                for suffix, content in ((".png", p.read_bytes()), (".cls", p.parent.name.encode())):
                    info = tarfile.TarInfo(p.stem + suffix)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return {"manifest": str(manifest), "parquet": str(root / "images.parquet"),
            "webdataset": str(root / "shards" / "part-*.tar")}


def start_child_audit(source, output, weights, address: str) -> subprocess.Popen:
    """A driver in a child process (its own process group) running the audit of ``source`` into
    ``output`` (paths or URIs) with a VGG11 at 32 px, 8 images a shard, joining the Ray at
    ``address``; the caller kills it (``child_run`` in tests/conftest.py does at the test's end)."""
    code = (
        "import ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "from lrpscale.config import RunConfig\nfrom lrpscale.run.audit import run_audit\n"
        f"run_audit(RunConfig(input={str(source)!r}, output={str(output)!r}, model='vgg11', "
        f"weights={str(weights)!r}, image_size=32, shard_size=8, batch_size=4))\n"
    )
    # the session's Ray listens on loopback only (session.ensure_ray): a driver joining it
    # must take 127.0.0.1 as its own address too
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def wait_for_commits(location, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run at ``location`` (a path or URI) has ``count`` committed shards; fail the
    test if the driver ends first or nothing moves within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(RunStore(location).committed()) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before {count} shards were committed")
        time.sleep(0.2)
    pytest.fail("no progress")


def session_processes(ray_module, fragment: str) -> list[int]:
    """Pids of this Ray session's processes whose command line (Ray sets it to ray::<actor class>)
    contains ``fragment``: descendants of the processes that name the session directory."""
    import psutil

    session = ray_module._private.worker._global_node.get_session_dir_path()
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(session in part for part in p.info["cmdline"] or ())]
    found = set()
    for process in (p for root in roots for p in [root, *root.children(recursive=True)]):
        try:
            if fragment in " ".join(process.cmdline()):
                found.add(process.pid)
        except psutil.Error:
            continue
    return sorted(found)
