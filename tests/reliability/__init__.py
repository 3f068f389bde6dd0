"""Reliability tests: chaos (test_chaos.py), soak and churn (test_soak.py), and races on
the supervisor itself (test_races.py), all with real worker processes.

The helpers shared by the three live here. Only the standard library is imported at
module level: every worker imports this package on its way to
``tests.reliability.kernels``, and should not pay for psutil or corral's supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import corral

KERNEL = "tests.reliability.kernels:make"
MiB = 1 << 20


# -- resources of the host process (the supervisor's side) --------------------------------------


@dataclass(frozen=True)
class Resources:
    """What the test process holds: open fds, OS threads, asyncio tasks, RSS."""

    fds: int
    threads: int
    tasks: int
    rss: int  # bytes

    @classmethod
    def now(cls, settle: set[threading.Thread] | None = None) -> Resources:
        """A snapshot. With ``settle`` (the threads there were before), first give threads
        started since then up to 10 s to finish exiting: ``aclose()`` has told corral's
        memory-probe thread to end, and it has run its last statement, but does not join
        it (that would block the loop), so it may still exist for a moment. A thread
        still there after that is counted."""
        for thread in threading.enumerate():
            if settle is not None and thread not in settle:
                thread.join(10.0)
        gc.collect()
        with open("/proc/self/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            threads=len(os.listdir("/proc/self/task")),
            tasks=len(asyncio.all_tasks()),
            rss=rss_kb * 1024,
        )

    def describe(self) -> str:
        return (
            f"fds={self.fds} threads={self.threads} tasks={self.tasks} rss={self.rss / MiB:.1f}MiB"
        )

    def leaks_since(self, before: Resources, rss_bound: int) -> list[str]:
        """What grew from ``before`` to this snapshot: any fd, thread or task, or RSS by
        more than ``rss_bound`` bytes."""
        leaks = []
        if self.fds > before.fds:
            leaks.append(f"fds {before.fds} -> {self.fds}: {_fd_targets()}")
        if self.threads > before.threads:
            names = [t.name for t in threading.enumerate()]
            leaks.append(f"threads {before.threads} -> {self.threads}: {names}")
        if self.tasks > before.tasks:
            leaks.append(f"tasks {before.tasks} -> {self.tasks}: {asyncio.all_tasks()}")
        if self.rss - before.rss > rss_bound:
            leaks.append(
                f"rss grew {(self.rss - before.rss) / MiB:.1f} MiB (bound {rss_bound / MiB:.0f})"
            )
        return leaks


def _fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    return out


# -- processes ----------------------------------------------------------------------------------


def descendants() -> set[int]:
    """Pids of every process below this one, zombies included."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def leftover_processes(before: set[int]) -> list[str]:
    """Processes below this one that were not there ``before`` (zombies included: an
    unreaped child is a leak too), described."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            out.append(f"{proc.pid} ({proc.status()}) {' '.join(proc.cmdline())[:100]}")
    return out


def live_grandchildren() -> list[int]:
    """Running (not zombie) children of this process's children: the workers of the
    supervisors this process runs (each warden is a child of the host)."""
    import psutil

    out = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            for grandchild in child.children():
                with contextlib.suppress(psutil.Error):
                    if grandchild.status() != psutil.STATUS_ZOMBIE:
                        out.append(grandchild.pid)
    return out


class PidLedger:
    """Every worker pid a test saw, with its start time, so that after ``aclose()`` it can
    tell "still running" from "pid reused by an unrelated process" (pid_max may be small).
    Pids verified gone can be forgotten on the way (:meth:`prune`), to stay small."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.seen = 0  # pids recorded, forgotten ones included

    def saw(self, pid: int | None) -> None:
        if pid is None or pid in self.started:
            return
        import psutil

        with contextlib.suppress(psutil.Error):
            self.started[pid] = psutil.Process(pid).create_time()
            self.seen += 1

    def still_running(self) -> list[int]:
        import psutil

        alive = []
        for pid, created in self.started.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    def prune(self, keep: set[int | None]) -> None:
        """Forget the pids that are gone, except those in ``keep``."""
        running = set(self.still_running())
        for pid in [p for p in self.started if p not in running and p not in keep]:
            del self.started[pid]


# -- "never two live workers for one tenant" ------------------------------------------------------


def temporary_directory() -> Iterator[Path]:
    """A directory removed when the test ends (pytest's ``tmp_path`` outlives the run).
    Test modules make it a fixture: ``pytest.fixture(temporary_directory, name="scratch")``."""
    with tempfile.TemporaryDirectory(prefix="corral-reliability-") as path:
        yield Path(path)


def make_lock_dir(root: Path, tenants: list[str]) -> Path:
    """The directory of per-tenant lock files for the kernels' overlap detector."""
    directory = root / "tenant-locks"
    directory.mkdir()
    for tenant in tenants:
        (directory / f"{tenant}.lock").touch()
    return directory


def overlap_options(lock_dir: Path) -> dict[str, Any]:
    """Supervisor options that turn on the kernels' overlap detector: the lock directory
    in the workers' environment, and readable under the default sandbox."""
    import msgspec

    from corral import Sandbox
    from tests.reliability.kernels import LOCK_DIR_ENV

    return {
        "env": {LOCK_DIR_ENV: str(lock_dir)},
        "sandbox": msgspec.structs.replace(Sandbox.default(), extra_read_paths=(str(lock_dir),)),
    }


class CorralLogs(logging.Handler):
    """While attached (to the ``corral`` logger): worker output (``corral.worker``) is
    scanned for the kernels' overlap mark; corral's own ERROR records are kept, each a
    failure (e.g. a worker not reaped ``kill_timeout`` after SIGKILL, a hook that raised);
    and its records below ERROR are not made at all: a chaos run's thousands of expected
    warnings ("killing worker: ...") would only pile up in pytest's log capture. Must not
    block: it runs inside corral's callbacks."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.overlaps: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from tests.reliability.kernels import OVERLAP_MARK

        message = record.getMessage()
        if record.name == "corral.worker" and OVERLAP_MARK in message:
            self.overlaps.append(message)
        elif record.levelno >= logging.ERROR:
            self.errors.append(f"{record.name}: {message}")

    @classmethod
    @contextlib.contextmanager
    def attached(cls) -> Iterator[CorralLogs]:
        handler = cls()
        corral_log, worker_log = logging.getLogger("corral"), logging.getLogger("corral.worker")
        levels = corral_log.level, worker_log.level
        corral_log.setLevel(logging.ERROR)
        worker_log.setLevel(logging.INFO)
        corral_log.addHandler(handler)
        try:
            yield handler
        finally:
            corral_log.removeHandler(handler)
            corral_log.setLevel(levels[0])
            worker_log.setLevel(levels[1])


def _has_exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


class AnswerWatch:
    """At most one live process answers for a tenant, and a live process answers for one
    tenant only.

    Fed every answer (tenant, pid). It keeps a pidfd for each pid that answered (pidfds
    refer to the process, not the number, so pid reuse cannot fool it). When ``pid``
    answers for ``tenant``, every *other* process that answered for ``tenant`` before must
    have exited already: corral starts a tenant's new worker only once the old one is gone,
    and ``pid`` answering means it had started. A process still running then is a second
    live worker for the tenant: a violation.
    """

    def __init__(self) -> None:
        self._by_pid: dict[int, tuple[str, int]] = {}  # pid -> (tenant, pidfd)
        self._by_tenant: defaultdict[str, set[int]] = defaultdict(set)
        self.answers = 0
        self.violations: list[str] = []

    def answered(self, tenant: str, pid: int) -> None:
        self.answers += 1
        entry = self._by_pid.get(pid)
        if entry is not None and _has_exited(entry[1]):
            self._forget(pid)  # that process is gone: this is a reused pid
            entry = None
        if entry is None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = -1  # exited (and reaped) since it answered: nothing to track
            if fd >= 0:
                self._by_pid[pid] = (tenant, fd)
                self._by_tenant[tenant].add(pid)
        elif entry[0] != tenant:
            self.violations.append(f"pid {pid} answered for {entry[0]!r} and for {tenant!r}")
        for other in list(self._by_tenant[tenant]):
            if other == pid:
                continue
            if _has_exited(self._by_pid[other][1]):
                self._forget(other)
            else:
                self.violations.append(
                    f"pid {pid} answered for {tenant!r} while pid {other}, which answered for "
                    "it before, still runs"
                )

    @property
    def open_fds(self) -> int:
        """pidfds held (counted in the host's fds while the watch runs)."""
        return len(self._by_pid)

    def _forget(self, pid: int) -> None:
        tenant, fd = self._by_pid.pop(pid)
        self._by_tenant[tenant].discard(pid)
        os.close(fd)

    def close(self) -> None:
        for pid in list(self._by_pid):
            self._forget(pid)


def table_problems(sup: corral.Supervisor) -> list[str]:
    """What is wrong in one ``stats()`` snapshot: a tenant or pid listed twice, more
    workers than ``max_workers``."""
    stats = sup.stats()
    tenants = [w.tenant for w in stats.workers]
    pids = [w.pid for w in stats.workers if w.pid is not None]
    problems = []
    if len(set(tenants)) != len(tenants):
        problems.append(f"a tenant listed twice: {sorted(tenants)}")
    if len(set(pids)) != len(pids):
        problems.append(f"a pid listed twice: {sorted(pids)}")
    if len(stats.workers) > stats.max_workers:
        problems.append(f"{len(stats.workers)} workers > max_workers={stats.max_workers}")
    return problems


class LoopErrors:
    """Records what reaches the event loop's exception handler while installed: an
    exception in a reader callback, a future resolved twice, "Task exception was never
    retrieved", ... Each is a bug somewhere."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[LoopErrors]:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

        loop.set_exception_handler(handler)
        try:
            yield self
        finally:
            loop.set_exception_handler(previous)
