"""Kernels and a memory probe for the cluster tests, loaded on the Ray nodes by import
string (``tests.cluster.kernels:make``) and by reference (:class:`PressureProbe`).

**Overlap detector.** When the workers' environment has :data:`LOCK_DIR_ENV`, the factory
opens ``<dir>/<tenant>.lock`` (created by the test, world-readable: under the default
sandbox a worker may read there but not write, and as root it may run as a uid of its
own) and takes a non-blocking exclusive ``flock`` on it for the worker's whole life. All
nodes of the test cluster share this machine's file system, so a second live worker
for the same tenant anywhere in the cluster fails to take it: that worker answers
every call with ``overlap: True``. The OS releases the lock when the process exits.

**Gate.** :meth:`Kernel.hold` is a call that stays in flight until the test lets it go,
with locks only (a worker may read the test's directory, not write it): it takes a
shared ``flock`` on ``<dir>/<tenant>.entered`` (the test sees it is in: its own
``LOCK_EX | LOCK_NB`` there fails), then blocks on a shared ``flock`` of ``<dir>/gate``,
which the test holds exclusively until it opens the gate (or until its process exits,
so a failed test never leaves a worker blocked). A worker killed while blocked simply
dies; the OS drops its locks.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Any

from corral.supervisor._memory import MemorySample, ProcTreeProbe

LOCK_DIR_ENV = "CORRAL_CLUSTER_LOCKS"
GATE = "gate"


class Kernel:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.pid = os.getpid()
        self.value: Any = None
        self.calls = 0
        self.overlap = self._take_lock()

    def _take_lock(self) -> bool:
        directory = os.environ.get(LOCK_DIR_ENV)
        if not directory:
            return False
        self._lock_fd = os.open(os.path.join(directory, f"{self.tenant}.lock"), os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"CORRAL-CLUSTER-OVERLAP tenant={self.tenant} pid={self.pid}", flush=True)
            return True
        return False

    def whoami(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "pid": self.pid, "overlap": self.overlap}

    def put(self, value: Any) -> int:
        self.value = value
        self.calls += 1
        return self.calls

    def get(self) -> Any:
        return self.value

    def incr(self) -> dict[str, Any]:
        self.calls += 1
        return {"calls": self.calls, "pid": self.pid, "overlap": self.overlap}

    def echo(self, value: Any) -> Any:
        return value

    def fail(self, message: str) -> None:
        raise ValueError(message)

    async def nap(self, seconds: float) -> dict[str, Any]:
        await asyncio.sleep(seconds)  # ok-sleep: a call in flight, for node loss
        self.calls += 1
        return {"calls": self.calls, "pid": self.pid, "overlap": self.overlap}

    def hold(self) -> dict[str, Any]:
        """A call in flight until the test opens the gate (see the module docstring)."""
        directory = os.environ[LOCK_DIR_ENV]
        entered = os.open(os.path.join(directory, f"{self.tenant}.entered"), os.O_RDONLY)
        try:
            fcntl.flock(entered, fcntl.LOCK_SH)  # "I am in"
            gate = os.open(os.path.join(directory, GATE), os.O_RDONLY)
            try:
                fcntl.flock(gate, fcntl.LOCK_SH)  # blocks while the test holds the gate
            finally:
                os.close(gate)
        finally:
            os.close(entered)
        self.calls += 1
        return {"calls": self.calls, "pid": self.pid, "overlap": self.overlap}


def make(tenant: str) -> Kernel:
    return Kernel(tenant)


class PressureProbe(ProcTreeProbe):
    """The real probe, except that a node whose id is a file in ``flag_dir`` reports no
    available memory: memory pressure on that node only (all test nodes share one host)."""

    def __init__(self, flag_dir: str) -> None:
        self.flag_dir = flag_dir
        self._node: str | None = None

    def __repr__(self) -> str:  # two front ends with equal probes share one deployment
        return f"PressureProbe({self.flag_dir!r})"

    def sample(self, roots: Any, exclude_roots: bool = False) -> MemorySample:
        result = super().sample(roots, exclude_roots)
        if self._node is None:
            import ray

            self._node = ray.get_runtime_context().get_node_id()
        if os.path.exists(os.path.join(self.flag_dir, self._node)):
            return MemorySample(result.trees, 0, result.total)
        return result
