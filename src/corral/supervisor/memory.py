"""Reading worker memory off the event loop.

psutil reads ``/proc``, which is a blocking call; the supervisor reaches it only
through a :class:`ProcessProbe`, run on one dedicated thread (:class:`ProbeThread`)
that the supervisor owns and joins on close. Policies that act on the samples
(limits, host pressure) live with the supervisor; this module only measures.

What is measured: the RSS of the worker's main process. A reused pid is never
misread: samples are keyed by pid and a process whose create time differs from
the one first seen is reported as gone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Sequence
from typing import Protocol

import psutil

__all__ = ["ProbeThread", "ProcessProbe", "PsutilProbe"]


class ProcessProbe(Protocol):
    def rss(self, pids: Sequence[int]) -> dict[int, int]:
        """Resident set size in bytes of each live pid (missing: gone). May block."""
        ...


class PsutilProbe:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def rss(self, pids: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        live = set(pids)
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                elif not proc.is_running():  # compares create time: catches pid reuse
                    del self._procs[pid]
                    continue
                out[pid] = proc.memory_info().rss
            except psutil.Error:
                self._procs.pop(pid, None)
        return out


class ProbeThread:
    """Runs probe calls on one thread of its own, so the event loop never blocks on /proc."""

    def __init__(self, probe: ProcessProbe) -> None:
        self._probe = probe
        # (pids, future); pids None asks the thread to finish and resolve the future last.
        self._requests: queue.SimpleQueue[
            tuple[Sequence[int] | None, asyncio.Future[dict[int, int]]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def rss(self, pids: Sequence[int]) -> dict[int, int]:
        loop = asyncio.get_running_loop()
        if self._thread is None:
            # daemon: if the host never calls aclose(), this thread must not keep it alive
            # at exit. It holds nothing that needs a clean end.
            self._thread = threading.Thread(target=self._run, name="corral-probe", daemon=True)
            self._thread.start()
        fut: asyncio.Future[dict[int, int]] = loop.create_future()
        self._requests.put((pids, fut))
        return await fut

    def _run(self) -> None:
        while True:
            pids, fut = self._requests.get()
            loop = fut.get_loop()
            if pids is None:
                loop.call_soon_threadsafe(_set_result, fut, {})
                return
            try:
                result = self._probe.rss(pids)
            except Exception as exc:  # handed to the awaiting task, which decides
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    async def aclose(self) -> None:
        """Stop the thread; it has finished its last statement when this returns."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        done: asyncio.Future[dict[int, int]] = asyncio.get_running_loop().create_future()
        self._requests.put((None, done))
        await done  # the thread resolved this as its last act and is exiting (no join: that
        # would block the loop, however briefly)


def _set_result(fut: asyncio.Future[dict[int, int]], value: dict[int, int]) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[dict[int, int]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
