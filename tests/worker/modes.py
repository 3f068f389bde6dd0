"""Kernels for the worker loop's two modes (blocking, and asyncio): each reports what it
runs on, so a test can tell which mode served it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

MARK_ENV = "CORRAL_TEST_MODES_MARK"  # a file where shutdown() notes how it ran


def loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SyncKernel:
    """No ``async def`` anywhere: served without an event loop until a call returns an
    awaitable."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.notes: dict[str, Any] = {}

    def on_loop(self) -> bool:
        return loop_running()

    def put(self, key: str, value: Any) -> int:
        self.notes[key] = value
        return len(self.notes)

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def unencodable(self) -> object:
        return object()

    def crash(self, code: int) -> None:
        os._exit(code)

    def later(self, value: Any, delay: float = 0.0) -> Any:
        """A plain method that returns an awaitable: the worker has to await it."""

        async def wait() -> Any:
            await asyncio.sleep(delay)  # ok-sleep: the kernel's workload
            return value

        return wait()

    def later_fail(self, message: str) -> Any:
        async def wait() -> None:
            raise KeyError(message)

        return wait()

    def shutdown(self) -> None:
        self._mark(f"sync shutdown on_loop={loop_running()}")

    def _mark(self, line: str) -> None:
        path = os.environ.get(MARK_ENV)  # set by the test that reads the mark
        if path:
            with open(path, "a") as mark:
                mark.write(line + "\n")


class AsyncShutdownKernel(SyncKernel):
    """Sync methods, but an ``async def shutdown``: still served without a loop; the
    hook gets one of its own."""

    async def shutdown(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)  # ok-sleep: a real await, no waiting
        super()._mark(f"async shutdown on_loop={loop_running()}")


class MixedKernel(SyncKernel):
    """One ``async def`` method: served on asyncio from the start, sync methods included."""

    async def ping(self) -> str:
        await asyncio.sleep(0)  # ok-sleep: a real await, no waiting
        return "pong"


class StaticAsync(SyncKernel):
    @staticmethod
    async def ping() -> str:
        return "pong"


class Tripped(BaseException):
    """Raised by a kernel's trap: the mode check ran kernel code."""


class HostileDir(SyncKernel):
    """Traps the mode check would spring if it listed or looked up attributes."""

    def __dir__(self) -> list[str]:
        raise Tripped("__dir__ ran")

    def __getattr__(self, name: str) -> Any:
        raise Tripped(f"__getattr__({name!r}) ran")


class BackgroundFactoryKernel(SyncKernel):
    """All-sync, but made by a plain factory that started a task on the loop that
    ``asyncio.get_event_loop()`` gave it: that loop must serve, or the task never runs."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        self.ticks = 0
        asyncio.get_event_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.001)  # ok-sleep: the kernel's background work

    def ticked(self) -> int:
        return self.ticks


class TrapProperty(SyncKernel):
    """A property that would raise if the mode check ran it."""

    @property
    def trap(self) -> int:
        raise RuntimeError("the mode check must not run kernel attributes")


def make(tenant: str) -> SyncKernel:
    return SyncKernel(tenant)


def make_async_shutdown(tenant: str) -> SyncKernel:
    return AsyncShutdownKernel(tenant)


def make_mixed(tenant: str) -> SyncKernel:
    return MixedKernel(tenant)


def make_background(tenant: str) -> SyncKernel:
    return BackgroundFactoryKernel(tenant)


def make_needing_loop(tenant: str) -> SyncKernel:
    """A plain factory that needs a running loop (it asks for one): told how to get it."""
    asyncio.get_running_loop()
    return SyncKernel(tenant)


async def make_awaited(tenant: str) -> SyncKernel:
    """An async factory: its (all-sync) kernel is served on the loop that built it."""
    await asyncio.sleep(0)  # ok-sleep: a real await, no waiting
    return SyncKernel(tenant)
