"""A real multi-node Ray cluster on loopback for tests: a head and worker nodes started with
``ray start``, each node its own process tree, killable one node at a time.

Everything is scoped to this cluster: its own short temp directory (unix socket paths must stay
short, and ``ray.init()`` elsewhere must not find it through ``/tmp/ray/ray_current_cluster``), its
own free ports, and it stops only the processes it started, never with a bare ``ray stop``, which
would kill every Ray instance of the user on the machine. The cluster address is never exported
into this process's environment: drivers run as subprocesses with ``cluster.env``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# `ray start` turns 127.0.0.1 (in --node-ip-address and --address) into the machine's outward
# address and then listens on every interface (ray-project/ray#59110). Ray keeps loopback only
# where multi-node clusters are switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `env`
# sets for the nodes' processes and the clients), but `ray start` then refuses to start a worker
# node; so the nodes are started through the ray CLI with that refusal and the rewrite lifted.
_RAY_START_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.exit(main())
"""
AUTH_TOKEN = Path.home() / ".ray" / "auth_token"
LOOPBACK = "127.0.0.1"
# the GCS declares a silent node dead after about 5 s instead of about 30 s
_FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                    "RAY_health_check_failure_threshold": "5"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    """One ``ray start --block`` process and the node it runs; ``node_id`` is the raylet's."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    node_id: str | None = None

    def raylet(self) -> psutil.Process | None:
        try:
            return next((p for p in psutil.Process(self.process.pid).children(recursive=True)
                         if p.name() == "raylet"), None)
        except psutil.NoSuchProcess:
            return None

    def processes(self) -> list[psutil.Process]:
        """The node's processes: the ``ray start`` monitor and all its descendants (GCS, raylet,
        agents, and the workers the raylet forked, which sit in their own sessions), plus any
        process whose command line still names this node's temp directory (workers rename
        themselves ``ray::...``, so list them while the raylet is alive or stopped)."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.process.pid)
            found[root.pid] = root
            found.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        marker = str(self.temp_dir)
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(part.endswith(marker) or marker + "/" in part for part in process.info["cmdline"] or ()):
                    found.setdefault(process.pid, process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())


class LoopbackCluster:
    """A head node plus worker nodes on 127.0.0.1, each node with its own process tree.

    ``with LoopbackCluster(head_cpus=1) as cluster: cluster.add_worker(2, {"accel_slot": 1})``;
    ``cluster.address`` is the GCS address, ``cluster.env`` the environment for drivers and CLI
    clients (RAY_ADDRESS, and RAY_AUTH_MODE=token when ~/.ray/auth_token exists), and with
    ``dashboard=True`` ``cluster.dashboard_url`` serves ``ray job submit``.
    """

    def __init__(self, head_cpus: int = 1, head_resources: dict | None = None, dashboard: bool = False,
                 object_store_memory: int = 128 * 1024 ** 2, start_timeout: float = 60.0):
        self.head_cpus, self.head_resources = head_cpus, head_resources or {}
        self.dashboard, self.object_store_memory = dashboard, object_store_memory
        self.start_timeout = start_timeout
        # short: a node's socket path is <root>/<node>/session_<date>_<pid>/sockets/plasma_store
        self.root = Path(tempfile.mkdtemp(prefix="lrpc-", dir="/tmp"))
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://{LOOPBACK}:{self.dashboard_port}" if dashboard else None
        # every Ray process of the cluster and every client takes 127.0.0.1 as its own address
        self.env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        if AUTH_TOKEN.is_file():
            self.env["RAY_AUTH_MODE"] = "token"
        self.head: Node | None = None
        self.workers: list[Node] = []

    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def nodes(self) -> list[Node]:
        return ([self.head] if self.head else []) + self.workers

    def start(self) -> Node:
        arguments = ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                     f"--dashboard-port={self.dashboard_port}", f"--dashboard-host={LOOPBACK}",
                     f"--include-dashboard={'true' if self.dashboard else 'false'}"]
        self.head = self._launch("head", arguments, self.head_cpus, self.head_resources)
        self._await(self.head)
        return self.head

    def add_worker(self, num_cpus: int, resources: dict | None = None) -> Node:
        """Start a worker node that joins the head; returns once the node is registered."""
        return self.add_workers(1, num_cpus, resources)[0]

    def add_workers(self, count: int, num_cpus: int, resources: dict | None = None) -> list[Node]:
        """Start ``count`` alike worker nodes at once (start-up is slow on a small machine);
        returns once all are registered."""
        nodes = [self._launch(f"w{len(self.workers) + 1}", [f"--address={self.address}"], num_cpus, resources or {})
                 for _ in range(count)]
        for node in nodes:
            self._await(node)
        return nodes

    def _launch(self, name: str, arguments: list[str], num_cpus: int, resources: dict) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir()
        log = self.root / f"{name}.log"
        command = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", "--block", *arguments,
                   f"--node-ip-address={LOOPBACK}", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
                   f"--resources={json.dumps(resources)}", f"--object-store-memory={self.object_store_memory}",
                   "--disable-usage-stats", "--node-manager-port=0", "--object-manager-port=0",
                   "--runtime-env-agent-port=0", "--metrics-export-port=0", "--dashboard-agent-grpc-port=0",
                   f"--dashboard-agent-listen-port={free_port()}"]
        env = {**self.env, **_FAST_NODE_DEATH}
        env.pop("RAY_ADDRESS")
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        node = Node(name, process, temp_dir, log)
        if name == "head":
            self.head = node
        else:
            self.workers.append(node)
        return node  # in the cluster's lists at once, so stop() reaches it even if it never starts

    def _await(self, node: Node) -> None:
        deadline = time.time() + self.start_timeout
        while "Ray runtime started" not in node.log.read_text(errors="replace"):
            if node.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start for node {node.name} failed (exit {node.process.poll()}); "
                                   f"its log:\n{node.log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        raylet = node.raylet()
        if raylet is None:
            raise RuntimeError(f"node {node.name} started without a raylet; see {node.log}")
        node.node_id = next(part.split("=", 1)[1] for part in raylet.cmdline() if part.startswith("--node_id="))

    def kill_node(self, node: Node) -> None:
        """Lose a node the hard way: SIGKILL its raylet, its workers and the rest of its process
        tree at once, as if the machine disappeared. The raylet is stopped first so it cannot fork
        a worker between the listing and the kill."""
        self._kill(node)
        if node in self.workers:
            self.workers.remove(node)

    def _kill(self, node: Node) -> None:
        for process in [node.raylet(), _process(node.process.pid)]:
            if process is not None:
                _signal(process, signal.SIGSTOP)
        for _ in range(3):  # the root is gone after the first pass: later passes find by command line
            processes = node.processes()
            if not processes:
                break
            for process in processes:
                _signal(process, signal.SIGKILL)
            psutil.wait_procs(processes, timeout=5)
        node.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), gracefully, then SIGKILL what is
        left; never touches other Ray instances on the machine. Safe to call twice."""
        nodes = list(reversed(self.nodes))
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)  # ray start --block drains and stops its node
        deadline = time.time() + 5  # a worker node drains for up to 30 s; a test cluster need not
        for node in nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for node in nodes:
            self._kill(node)
        self.workers, self.head = [], None
        shutil.rmtree(self.root, ignore_errors=True)

    def listening_addresses(self) -> set[str]:
        """The IP addresses the cluster's processes listen on (TCP)."""
        addresses = set()
        for node in self.nodes:
            for process in node.processes():
                try:
                    addresses.update(c.laddr.ip for c in process.net_connections("tcp")
                                     if c.status == psutil.CONN_LISTEN)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return addresses


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _signal(process: psutil.Process, number: int) -> None:
    try:
        process.send_signal(number)
    except psutil.NoSuchProcess:
        pass
