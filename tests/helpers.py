"""What the test modules share: the test kernel's name, short timeouts, a supervisor
factory, and ways to wait (for an event, a condition, a process) with a deadline.

Waiting is always on something that says it happened (an event, a pidfd) under a
deadline; never a sleep. The in-memory launcher for pool tests is in :mod:`tests.fakes`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import psutil
import pytest

import corral
from corral import Supervisor, WorkerEvent, WorkerInfo
from corral.supervisor import Factory

T = TypeVar("T")

K = "tests.kernels:make"
"""The well-behaved test kernel (:class:`tests.kernels.Kernel`), by import string."""

FAST: dict[str, Any] = {"shutdown_timeout": 2.0, "term_timeout": 1.0, "start_timeout": 20.0}
"""Stop and start timeouts for real workers: short, with room for a busy host."""

SERVE_FAST = ("--start-timeout", "20", "--shutdown-timeout", "2", "--term-timeout", "1")
"""The same timeouts as ``corral serve`` flags."""


def supervisor(factory: Factory = K, **options: Any) -> Supervisor:
    """A :class:`Supervisor` of ``factory`` with the :data:`FAST` timeouts (``options``
    override them). Not started: ``async with supervisor(...) as sup:``."""
    return Supervisor(factory, **{**FAST, **options})


async def within(awaitable: Awaitable[T], timeout: float = 30.0) -> T:
    """``await awaitable`` with a deadline (a hang fails the test with TimeoutError)."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def wait_until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Turn the loop until ``predicate()`` holds, with a deadline. Only for state that has
    nothing to wait on (corral's private state, another process's); prefer an event."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)  # ok-sleep: one loop turn, not a wait for time


def open_fds() -> set[int]:
    """This process's open file descriptors (to check that a test closed what it opened)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def worker_info(sup: Supervisor, tenant: str) -> WorkerInfo:
    """``tenant``'s worker as ``stats()`` describes it (it must have one)."""
    found = [w for w in sup.stats().workers if w.tenant == tenant]
    assert found, f"{tenant} has no worker: {sup.keys()}"
    return found[0]


class Recorder(Generic[T]):
    """Collects items (events, log records) with the time they arrived (``clock``,
    monotonic by default); a test awaits the first one that matches. Fed on the event
    loop's thread only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.seen: list[tuple[float, T]] = []
        self._clock = clock
        self._changed = asyncio.Event()

    def add(self, item: T) -> None:
        self.seen.append((self._clock(), item))
        self._changed.set()

    async def first(self, match: Callable[[T], bool], timeout: float = 30.0) -> tuple[float, T]:
        """The first item so far or to come that matches, and when it came."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                for when, item in self.seen:
                    if match(item):
                        return when, item
                await self._changed.wait()

    @property
    def items(self) -> list[T]:
        return [item for _, item in self.seen]


class EventLog(Recorder[WorkerEvent]):
    """An ``on_event`` hook that keeps every event; ``await log.stopped("t")`` waits (with
    a deadline) for the first stop of ``t``'s worker."""

    def __call__(self, event: WorkerEvent) -> None:
        self.add(event)

    async def stopped(self, tenant: str, timeout: float = 30.0) -> corral.WorkerStopped:
        _, event = await self.first(stopped(tenant), timeout)
        assert isinstance(event, corral.WorkerStopped)
        return event

    def brief(self) -> list[tuple[str, str, str | None]]:
        """(kind, tenant, reason) of each event so far; reason None but for stops and
        backoffs."""
        return [(e.kind, e.tenant, getattr(e, "reason", None)) for e in self.items]


def stopped(tenant: str) -> Callable[[WorkerEvent], bool]:
    """Matches the "stopped" events of ``tenant``."""
    return lambda e: e.kind == "stopped" and e.tenant == tenant


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone: it is not running code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_pid_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``pid`` exits, via a pidfd (works for processes that are not our children)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def wait_pids_exit(pids: list[int], timeout: float) -> list[int]:
    """Block until every pid has exited (zombies count as exited) or ``timeout`` passes;
    return those still running. Uses pidfds, so it works for processes that are not ours."""
    import select
    import time

    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = dict(fds)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _event in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.pop(fd, None)
        return sorted(pending.values())
    finally:
        for fd in fds:
            os.close(fd)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_host(code: str, timeout: float, user: int | None = None) -> tuple[str, int | None]:
    """Run ``code`` as a separate host process (with this checkout importable; as uid and
    gid ``user`` if given) and return its stdout and return code; the return code is None
    if it did not finish in time (it is then killed)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    host = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )
    try:
        out, _ = host.communicate(timeout=timeout)
        return out, host.returncode
    except subprocess.TimeoutExpired:
        host.kill()
        out, _ = host.communicate()
        return out, None


REQUIRE_STRICT = os.environ.get("CORRAL_REQUIRE_STRICT") == "1"


async def start_strict(sup: corral.Supervisor) -> corral.Supervisor:
    """Start ``sup``, whose sandbox needs the root-only layers. Where this host cannot
    provide them (not root; an interpreter in a private home directory), the test is
    skipped, with corral's own reason; with ``CORRAL_REQUIRE_STRICT=1`` (CI) it fails."""
    try:
        await sup.start()
    except corral.StartError as exc:
        if "the sandbox requires layers" not in str(exc):
            raise
        if REQUIRE_STRICT:
            pytest.fail(f"strict sandbox required (CORRAL_REQUIRE_STRICT=1): {exc}")
        pytest.skip(f"strict sandbox unavailable here: {exc}")
    return sup


class Served:
    """``corral serve`` in a subprocess on a free loopback port.

    With ``wait`` (the default) it is ready to take calls when the constructor returns;
    otherwise :meth:`wait_ready` waits for its ready line. ``url`` is its base URL.
    :meth:`stop` sends SIGTERM (a graceful shutdown) and returns the exit code; the
    process is killed if it outlives ``timeout``."""

    def __init__(
        self,
        *args: str,
        log: str | os.PathLike[str],
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        import subprocess
        import sys

        self.log_path = os.fspath(log)
        self.log = open(log, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.url = ""
        if wait:
            try:
                self.wait_ready(timeout)
            except RuntimeError:
                self.stop()
                raise

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait (with a deadline) for the ready line; return the base URL."""
        import select
        import time

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("corral serve: ready on "):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            line = self.proc.stdout.readline() if ready else ""
            if (not ready or not line) and (left <= 0 or self.proc.poll() is not None):
                raise RuntimeError(f"corral serve did not get ready: {self.tail()}")
        self.url = line.removeprefix("corral serve: ready on ").strip().rstrip("/")
        return self.url

    def tail(self) -> str:
        """The end of what it wrote to stderr."""
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def stop(self, timeout: float = 30.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return code
