"""Measuring worker memory off the event loop, and the policy that acts on it.

What is measured, and why:

* **Per worker: the resident set (RSS) of its whole process tree**, i.e. the worker
  and every descendant, summed. One sweep reads ``/proc/<pid>/stat`` once per
  process on the host (parent pid and RSS sit in the same line), builds the tree
  and sums each worker's subtree: linear in the number of processes, no per-worker
  rescans. USS/PSS would need ``smaps`` (milliseconds per process) and are not
  worth it for limits: RSS over-counts only pages shared with the warden at fork
  time (the interpreter and corral, a few MiB, the same for every worker), which
  the baseline check at start accounts for.
* **Per worker with a memory cgroup: the larger of that and its cgroup's working
  set** (usage minus inactive file cache, as cAdvisor and the kubelet count it). The
  cgroup counts what the worker started wherever it went (a double-forked, setsid'd
  child reparented out of its tree), and memory no process maps (tmpfs, memfd, kernel
  memory); it does not count pages the worker still shares with the warden since the
  fork (charged to the warden), which tree RSS does and the baseline check expects.
  The larger of the two keeps an ordinary worker's figure what it always was and makes
  leaving the tree useless. The warden reports each worker's leaf (``WorkerSpawned``).
* **The host: available memory** as the kernel reports it (``MemAvailable``,
  through psutil), which counts reclaimable cache as available.

The probe is reached only through :class:`ProcessProbe`, run on one dedicated
thread (:class:`ProbeThread`), so ``/proc`` is never read on the event loop.
:class:`MemoryPolicy` is pure: it turns a sample into decisions.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import psutil

from corral.supervisor.records import StopReason

__all__ = [
    "CgroupAccounting",
    "MemoryPolicy",
    "MemorySample",
    "ProbeThread",
    "ProcTreeProbe",
    "ProcessProbe",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


class MemorySample(NamedTuple):
    trees: dict[int, int]  # root pid -> RSS of its whole tree, bytes (missing: gone)
    available: int  # host memory available, bytes
    total: int  # host memory, bytes


class ProcessProbe(Protocol):
    def sample(self, roots: Sequence[int], exclude_roots: bool = False) -> MemorySample:
        """Measure the trees rooted at ``roots`` and the host. May block.
        ``exclude_roots``: count only the roots' descendants (a root is corral's init of a
        worker's namespace, a copy of the warden, not the tenant's)."""
        ...


@runtime_checkable
class CgroupAccounting(Protocol):
    """Optional for a probe: correct a sample with what the workers' memory cgroups say.
    A probe without it (a test's fake numbers) is used as it is."""

    def with_cgroups(self, sample: MemorySample, cgroups: Mapping[int, str]) -> MemorySample:
        """``sample`` with each root in ``cgroups`` (root pid -> its memory cgroup leaf)
        measured from that cgroup too. May block."""
        ...


class ProcTreeProbe:
    """Reads ``/proc`` directly (the same files psutil reads), one pass per sample; for
    workers with a memory cgroup, also that cgroup (:meth:`with_cgroups`)."""

    def with_cgroups(self, sample: MemorySample, cgroups: Mapping[int, str]) -> MemorySample:
        """Each root with a memory cgroup weighs the larger of its tree RSS and its
        cgroup's working set (see the module docstring). A root missing from ``sample``
        is gone and stays missing; an unreadable cgroup leaves the tree figure."""
        trees = dict(sample.trees)
        for root, leaf in cgroups.items():
            if root in trees:
                charged = cgroup_working_set(leaf)
                if charged is not None and charged > trees[root]:
                    trees[root] = charged
        return sample._replace(trees=trees)

    def sample(self, roots: Sequence[int], exclude_roots: bool = False) -> MemorySample:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        # Hot loop over every process on the host: plain os calls, no file objects.
        o_open, o_read, o_close, flags = os.open, os.read, os.close, os.O_RDONLY
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                fd = o_open(f"/proc/{name}/stat", flags)
                try:
                    line = o_read(fd, 1024)
                finally:
                    o_close(fd)
            except OSError:  # gone meanwhile
                continue
            # "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            fields = line[line.rfind(b")") + 2 :].split(None, 22)
            pid = int(name)
            children.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * _PAGE
        trees: dict[int, int] = {}
        for root in roots:
            if root not in rss:
                continue
            total, stack = 0, list(children.get(root, ())) if exclude_roots else [root]
            while stack:
                pid = stack.pop()
                total += rss.get(pid, 0)
                stack.extend(children.get(pid, ()))
            trees[root] = total
        vm = psutil.virtual_memory()
        return MemorySample(trees, int(vm.available), int(vm.total))


def cgroup_working_set(leaf: str) -> int | None:
    """Bytes charged to the memory cgroup ``leaf`` (v2 or v1) less its inactive file
    cache, which the kernel reclaims first and a worker cannot hold on to: the working
    set, as cAdvisor and the kubelet define it. None if it cannot be read (gone)."""
    inactive = 0
    try:
        try:
            usage = int(_read_small(os.path.join(leaf, "memory.current")))  # v2
            key = b"inactive_file"
        except FileNotFoundError:
            usage = int(_read_small(os.path.join(leaf, "memory.usage_in_bytes")))  # v1
            key = b"total_inactive_file"
        for line in _read_small(os.path.join(leaf, "memory.stat"), 16384).splitlines():
            name, _, value = line.partition(b" ")
            if name == key:
                inactive = int(value)
                break
    except (OSError, ValueError):
        return None
    return max(0, usage - inactive)


def _read_small(path: str, size: int = 64) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


class MemoryPolicy:
    """Decides what memory samples mean. Pure: no I/O, no clock.

    Args:
        soft_limit: bytes per worker tree; above it the worker is recycled.
        min_available: bytes of host memory that must stay available, or a fraction
            (0 < x < 1) of the host's total.
        max_total: bytes for all worker trees together.
        hysteresis: pressure, once on, lasts until the margin is this fraction clear
            of the threshold (so that stopping one worker does not flip it off and on).
    """

    def __init__(
        self,
        *,
        soft_limit: int | None,
        min_available: float | None,
        max_total: int | None,
        hysteresis: float = 0.05,
    ) -> None:
        self.soft_limit = soft_limit
        self.min_available = min_available
        self.max_total = max_total
        self.hysteresis = hysteresis
        self.pressure: StopReason | None = None  # HOST_PRESSURE / TOTAL_MEMORY while it lasts

    @property
    def watches_pressure(self) -> bool:
        return self.min_available is not None or self.max_total is not None

    def available_floor(self, total: int) -> int | None:
        if self.min_available is None:
            return None
        if self.min_available < 1:
            return int(self.min_available * total)
        return int(self.min_available)

    def over_soft_limit(
        self, sample: MemorySample, limits: Mapping[int, int | None] | None = None
    ) -> list[int]:
        """Root pids whose tree is above its soft limit: ``limits[pid]`` where given (a
        tenant's own, or None for none), else the supervisor's."""
        limits = limits or {}
        over = []
        for pid, size in sample.trees.items():
            limit = limits.get(pid, self.soft_limit)
            if limit is not None and size > limit:
                over.append(pid)
        return over

    def update_pressure(self, sample: MemorySample) -> StopReason | None:
        """Whether corral is under memory pressure now (with hysteresis), and which kind."""
        floor = self.available_floor(sample.total)
        used = sum(sample.trees.values())
        slack = 1.0 + self.hysteresis if self.pressure is not None else 1.0
        if floor is not None and sample.available < floor * slack:
            self.pressure = StopReason.HOST_PRESSURE
        elif self.max_total is not None and used * slack > self.max_total:
            self.pressure = StopReason.TOTAL_MEMORY
        else:
            self.pressure = None
        return self.pressure

    def describe(self, sample: MemorySample) -> str:
        floor = self.available_floor(sample.total)
        used = sum(sample.trees.values())
        if self.pressure is StopReason.HOST_PRESSURE and floor is not None:
            return f"host memory available {_mib(sample.available)} is below {_mib(floor)}"
        if self.pressure is StopReason.TOTAL_MEMORY and self.max_total is not None:
            limit = _mib(self.max_total)
            return f"workers use {_mib(used)} together, over max_total_memory {limit}"
        return "no memory pressure"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class ProbeThread:
    """Runs probe calls on one thread of its own, so the event loop never blocks on /proc."""

    def __init__(self, probe: ProcessProbe) -> None:
        self._probe = probe
        # (roots, exclude_roots, cgroups, future); roots None asks the thread to finish and
        # resolve the future last.
        self._requests: queue.SimpleQueue[
            tuple[
                Sequence[int] | None,
                bool,
                Mapping[int, str],
                asyncio.Future[MemorySample | None],
            ]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def sample(
        self,
        roots: Sequence[int],
        exclude_roots: bool = False,
        cgroups: Mapping[int, str] | None = None,
    ) -> MemorySample:
        """A sample of ``roots`` (see :class:`ProcessProbe`); ``cgroups`` (root pid -> its
        memory cgroup leaf) are read too if the probe does :class:`CgroupAccounting`."""
        loop = asyncio.get_running_loop()
        if self._closed:  # a sampler still running while the supervisor closes
            raise RuntimeError("the memory probe is closed")
        if self._thread is None:
            # daemon: if the host never calls aclose(), this thread must not keep it alive
            # at exit. It holds nothing that needs a clean end.
            self._thread = threading.Thread(target=self._run, name="corral-probe", daemon=True)
            self._thread.start()
        fut: asyncio.Future[MemorySample | None] = loop.create_future()
        self._requests.put((roots, exclude_roots, dict(cgroups or {}), fut))
        result = await fut
        assert result is not None
        return result

    def _run(self) -> None:
        while True:
            roots, exclude_roots, cgroups, fut = self._requests.get()
            if roots is None:
                _hand_back(fut, _set_result, None)
                return
            try:
                result = self._probe.sample(roots, exclude_roots)
                if cgroups and isinstance(self._probe, CgroupAccounting):
                    result = self._probe.with_cgroups(result, cgroups)
            except Exception as exc:  # handed to the awaiting task, which decides
                _hand_back(fut, _set_exception, exc)
            else:
                _hand_back(fut, _set_result, result)

    async def aclose(self) -> None:
        """Stop the thread; it has finished its last statement when this returns. Later
        samples are refused (they would start a thread nobody stops)."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        done: asyncio.Future[MemorySample | None] = asyncio.get_running_loop().create_future()
        self._requests.put((None, False, {}, done))
        await done  # the thread resolved this as its last act and is exiting (no join: that
        # would block the loop, however briefly)


def _hand_back(
    fut: asyncio.Future[MemorySample | None],
    setter: Callable[[asyncio.Future[MemorySample | None], Any], None],
    value: Any,
) -> None:
    """From the probe thread to the future's loop; a closed loop has nobody waiting."""
    try:
        fut.get_loop().call_soon_threadsafe(setter, fut, value)
    except RuntimeError:
        pass


def _set_result(fut: asyncio.Future[MemorySample | None], value: MemorySample | None) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[MemorySample | None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
