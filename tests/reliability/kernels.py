"""Kernels for the reliability tests, loaded in real workers as ``tests.reliability.kernels:make``.

Every answer says who gave it: the tenant the factory was called with, the worker's pid,
and the caller's request id and nonce, so that a test can check each result came from the
right tenant's worker and belongs to the request that asked for it.

**Overlap detector.** When the environment variable :data:`LOCK_DIR_ENV` names a directory,
the factory opens ``<dir>/<tenant>.lock`` (which the test created, read-only: the default
sandbox lets a worker read but not write there) and takes a non-blocking exclusive
``flock`` on it, held for the worker's whole life: the OS releases it when the process
exits, which is before the warden can reap it, so before corral may start the tenant's
next worker. A second live worker for the same tenant cannot take it: that worker then
answers every call with ``overlap: True`` and prints :data:`OVERLAP_MARK` on its stdout
(corral logs worker output on the ``corral.worker`` logger), so the overlap is seen even
if the worker is never called. (The lock is never inherited: this kernel starts no
processes.)
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from typing import Any

LOCK_DIR_ENV = "CORRAL_RELIABILITY_LOCKS"
OVERLAP_MARK = "CORRAL-RELIABILITY-OVERLAP"
SLOW_PREFIX = "slow-"  # tenants whose factory takes SLOW_START_S to return
SLOW_START_S = 1.0
STUCK_PREFIX = "stuck-"  # tenants whose factory never returns (a start that never ends)
SYNC_PREFIX = "sync-"  # tenants whose kernel has plain methods only


class SyncReliabilityKernel:
    """Answers with its identity; has levers for faults (crash, hang, raise, garbage).
    Only plain methods: its worker serves it without an event loop."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.pid = os.getpid()
        self.overlap = self._take_lock()

    def _take_lock(self) -> bool:
        directory = os.environ.get(LOCK_DIR_ENV)
        if not directory:
            return False
        # A missing lock file is a test bug: raising makes it a StartError, which fails the test.
        self._lock_fd = os.open(os.path.join(directory, f"{self.tenant}.lock"), os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{OVERLAP_MARK} tenant={self.tenant} pid={self.pid}", flush=True)
            return True
        return False

    def _answer(self, req: int, nonce: str) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "pid": self.pid,
            "req": req,
            "nonce": nonce,
            "overlap": self.overlap,
        }

    # -- normal calls -------------------------------------------------------------------------

    def echo(self, req: int, nonce: str) -> dict[str, Any]:
        """Sync: runs on the worker's main thread, in arrival order."""
        return self._answer(req, nonce)

    def whoami(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "pid": self.pid, "overlap": self.overlap}

    # -- faults -------------------------------------------------------------------------------

    def fail(self, req: int, nonce: str) -> None:
        """The kernel raises: ``KernelError`` whose message names tenant, request and nonce."""
        raise ValueError(f"{self.tenant}|{req}|{nonce}")

    def crash(self, code: int) -> None:
        os._exit(code)

    def hang(self) -> None:
        """Sync: blocks the worker's only thread until it is killed."""
        time.sleep(3600)  # ok-sleep: a kernel that hangs on purpose

    def garbage(self) -> None:
        """Write a frame whose body is not msgpack to the reply pipe: a protocol violation."""
        os.write(4, b"\x00\x00\x00\x05" + b"\xc1" * 5)


class ReliabilityKernel(SyncReliabilityKernel):
    """The same, with async methods too: its worker serves it on asyncio."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        self.async_running = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._gates: dict[str, asyncio.Event] = {}

    async def aecho(self, req: int, nonce: str, delay: float = 0.0) -> dict[str, Any]:
        """Async: runs as a task, concurrently with other async calls."""
        self.async_running += 1
        self._quiet.clear()
        try:
            if delay:
                await asyncio.sleep(delay)  # ok-sleep: kernel workload, not synchronisation
            return self._answer(req, nonce)
        finally:
            self.async_running -= 1
            if not self.async_running:
                self._quiet.set()

    async def hold(self, req: int, nonce: str, gate: str) -> dict[str, Any]:
        """Async: answers once ``release(gate)`` is called."""
        self.async_running += 1
        self._quiet.clear()
        try:
            await self._gate(gate).wait()
            return self._answer(req, nonce)
        finally:
            self.async_running -= 1
            if not self.async_running:
                self._quiet.set()

    def release(self, gate: str) -> bool:
        self._gate(gate).set()
        return True

    def _gate(self, name: str) -> asyncio.Event:
        if name not in self._gates:
            self._gates[name] = asyncio.Event()
        return self._gates[name]

    async def settle(self) -> int:
        """Wait until no ``aecho``/``hold`` runs. Their replies were written before this
        one (a finished call's reply is written in the step that finishes it; this task
        wakes in a later step), so once this answers the supervisor has read them all."""
        await self._quiet.wait()
        return self.async_running

    async def ahang(self) -> None:
        """Async: never finishes; other calls on the worker go on until it is killed."""
        await asyncio.Event().wait()


def make(tenant: str) -> SyncReliabilityKernel:
    """``sync-`` tenants get the kernel with plain methods only (no event loop in their
    worker); every other tenant the one with async methods too."""
    if tenant.startswith(SLOW_PREFIX):
        time.sleep(SLOW_START_S)  # ok-sleep: a slow factory (e.g. loading a model), on purpose
    if tenant.startswith(STUCK_PREFIX):
        time.sleep(3600)  # ok-sleep: a factory that never returns; the worker is stopped
    if tenant.startswith(SYNC_PREFIX):
        return SyncReliabilityKernel(tenant)
    return ReliabilityKernel(tenant)
