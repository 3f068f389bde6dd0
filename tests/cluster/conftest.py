"""One Ray cluster per test module, on loopback only: a head node and two worker nodes
(``ray.cluster_utils.Cluster``), small, dashboard off; nothing is assumed to be running.

Every address is 127.0.0.1: each node's and the driver's ``node_ip_address``, and Ray's
own node-IP lookup (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it answer the loopback
address instead of the machine's other interface; set before Ray is imported, and
inherited by every process Ray starts).

The suite's leak check (tests/conftest.py) is replaced here: Ray's own processes and
threads live as long as the module's cluster, so after each test only corral's
processes are checked (no warden or worker of corral's left), and the full check
(no child process, no new thread) runs once the module's cluster is shut down.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

LOOPBACK = "127.0.0.1"
MiB = 2**20
NODE_ARGS: dict[str, Any] = {
    "num_cpus": 1,
    "object_store_memory": 80 * MiB,
    "node_ip_address": LOOPBACK,
}
# Node death seen in about a second (Ray's default is tens of seconds).
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}
_DEADLINE = 30.0


def corral_processes() -> list[psutil.Process]:
    """Every warden and worker of corral's below this process (the Ray nodes are its
    children; their command line runs corral.worker). Other test runs on this machine
    have theirs elsewhere."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "corral.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def wait_no_corral_processes(timeout: float = _DEADLINE) -> list[str]:
    """Wait until no corral process is left; returns those still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = corral_processes()
        if not left or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left if p.is_running()]
        time.sleep(0.1)  # ok-sleep: polling other processes' exit, no event exists for it


class RayCluster:
    """The module's cluster, and what the tests need to know about it."""

    def __init__(self) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **NODE_ARGS,
                "include_dashboard": False,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        self.workers = [self.cluster.add_node(**NODE_ARGS) for _ in range(2)]
        self.cluster.wait_for_nodes()
        ray.init(
            address=self.cluster.address,
            _node_ip_address=LOOPBACK,
            log_to_driver=False,
            configure_logging=False,
        )

    @property
    def head_id(self) -> str:
        return str(self.cluster.head_node.node_id)

    def add_node(self) -> Any:
        node = self.cluster.add_node(**NODE_ARGS)
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node)
        self.workers.remove(node)

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    me = psutil.Process()
    before_procs = {p.pid for p in me.children(recursive=True)}
    before_threads = set(threading.enumerate())
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()
    extra = [p for p in me.children(recursive=True) if p.pid not in before_procs]
    _gone, alive = psutil.wait_procs(extra, timeout=_DEADLINE)
    left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive if p.is_running()]
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    threads = [t for t in threading.enumerate() if t not in before_threads]
    for thread in threads:
        thread.join(_DEADLINE)
    assert not left, f"the Ray cluster left processes behind: {left}"
    assert not [t.name for t in threads if t.is_alive()], "the Ray cluster left threads behind"


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Replaces the suite's check for tests/cluster: after each test, no process of
    corral's (warden, worker) is left anywhere; the rest is checked per module above."""
    yield
    left = wait_no_corral_processes()
    assert not left, f"test left corral processes behind: {left}"
