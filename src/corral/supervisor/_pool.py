"""The pool: which tenants have a worker, and everything that decides it.

:class:`Pool` owns the tenant table (LRU and idle orders), waiting for room when
``max_workers`` are taken, restart backoff, the TTL sweeper, the start and stop
counts, and the handles' callbacks (it is their :class:`HandleListener`): a tenant
key goes ``Supervisor`` -> ``Pool.acquire`` -> table / backoff -> a new
``WorkerHandle``, and the handle's news comes back here only. The public façade
(:mod:`corral.supervisor.supervisor`) reads ``pool.table`` on the warm path and asks
the pool for everything else. The memory watch (:mod:`corral.supervisor._memwatch`)
chooses victims from ``pool.table`` and gates new workers through ``admit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from corral.errors import BackoffError, CapacityError, SupervisorClosedError
from corral.supervisor._backoff import BackoffPolicy, RestartTracker
from corral.supervisor._handle import HandleOptions, WorkerHandle
from corral.supervisor._outcomes import FAILURES
from corral.supervisor._process import Launcher
from corral.supervisor._table import WorkerTable
from corral.supervisor.events import (
    EventHub,
    TenantBackoff,
    WorkerReady,
    WorkerStarting,
    WorkerStopped,
)
from corral.supervisor.records import StopReason, StopReport, WorkerState
from corral.supervisor.tenants import check_tenant

__all__ = ["Pool"]

log = logging.getLogger("corral")

_SWEEP_MAX_WAIT = 30.0  # the sweeper also prunes backoff records; it wakes at least this often


class Pool:
    """The workers of one supervisor, by tenant.

    Args:
        launcher: starts the processes.
        handle_options: timeouts, limits and the Start message for every handle.
        max_workers / idle_ttl / pool_timeout: as the Supervisor's options.
        backoff: restart intensity and backoff.
        events: where lifecycle events go.
        refusal: the error a call gets now because the supervisor is not running (not
            started, closing or closed), or None while it is.
        admit: raises (MemoryPressureError) if no new worker may start now.
        clock: monotonic seconds, for the table and backoff.
    """

    def __init__(
        self,
        *,
        launcher: Launcher,
        handle_options: HandleOptions,
        max_workers: int,
        idle_ttl: float | None,
        pool_timeout: float,
        backoff: BackoffPolicy,
        events: EventHub,
        refusal: Callable[[], SupervisorClosedError | None],
        admit: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self.table: WorkerTable[WorkerHandle] = WorkerTable(max_workers, idle_ttl, clock)
        self.restarts = RestartTracker(backoff, clock)
        self.starts = 0
        self.stops: Counter[str] = Counter()
        self._launcher = launcher
        self._handle_options = handle_options
        self._pool_timeout = pool_timeout
        self._events = events
        self._refusal = refusal
        self._admit = admit
        self._clock = clock
        self._tg: asyncio.TaskGroup | None = None
        self._bound: asyncio.Future[None] | None = None  # set once the TaskGroup exists
        self._room = asyncio.Event()  # set (then replaced) when a slot may have freed
        self._room_waiters = 0
        self._idle_changed = asyncio.Event()  # wakes the TTL sweeper early
        self._sweep_due = 0.0  # monotonic time the sweeper will next look (0: awake)

    # -- the supervisor's runner -------------------------------------------------------------

    def expect_task_group(self) -> None:
        """The supervisor is starting: new workers wait for :meth:`bind`'s TaskGroup."""
        self._bound = asyncio.get_running_loop().create_future()

    def bind(self, tg: asyncio.TaskGroup) -> None:
        """Run workers' background tasks (starts, stop escalations) in ``tg``."""
        self._tg = tg
        if self._bound is not None and not self._bound.done():
            self._bound.set_result(None)

    def wake_all(self) -> None:
        """The supervisor is closing: callers waiting for room look again (and leave)."""
        self._notify_room()

    async def stop_all(self, reason: StopReason) -> list[WorkerHandle]:
        """Stop every worker (busy ones drain first) and wait until each is settled.
        Returns the handles, for the caller to wait for their deaths."""
        handles = self.table.handles()
        for handle in handles:
            handle.evict(reason)
        for handle in handles:
            await handle.wait_settled()
        return handles

    # -- acquiring a worker ------------------------------------------------------------------

    async def acquire(self, tenant: str) -> WorkerHandle:
        """A handle for ``tenant`` that is READY or BUSY (or was, a moment ago).
        Raises InvalidCallError for a key that breaks the rule, before anything else."""
        check_tenant(tenant)
        deadline: float | None = None
        evicted: WorkerHandle | None = None  # the victim this caller is waiting to see go
        while True:
            if (refused := self._refusal()) is not None:
                raise refused
            handle = self.table.get(tenant)
            if handle is not None:
                if handle.is_serving:
                    return handle
                if handle.state is WorkerState.STARTING:
                    await self._wait_ready(handle)
                    continue
                await handle.wait_dead()  # the old worker is on its way out: never overlap
                continue
            backoff = self.restarts.retry_after(tenant)
            if backoff is not None:
                left, level, last = backoff
                raise BackoffError(tenant, left, level, last)
            self._admit(tenant)
            if self.table.has_room():
                return await self._start_worker(tenant)
            # One victim at a time per caller: while the last one is still on its way out,
            # a worker turning idle meanwhile is not stopped as well (unless that victim is
            # past all corral can do to end it: settled and still not reaped).
            if evicted is None or evicted.is_settled:
                victim = self.table.lru_victim()
                if victim is not None:
                    evicted = self.table.peek(victim)
                    assert evicted is not None
                    evicted.evict(StopReason.LRU)
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._pool_timeout
            room = self._room
            self._room_waiters += 1
            try:
                async with asyncio.timeout_at(deadline):
                    await room.wait()
            except TimeoutError:
                raise CapacityError(
                    f"all {self.table.max_workers} workers are busy and none became free within "
                    f"{self._pool_timeout}s (raise max_workers or pool_timeout?)"
                ) from None
            finally:
                self._room_waiters -= 1

    async def _start_worker(self, tenant: str) -> WorkerHandle:
        if self._tg is None:  # the supervisor's start was cancelled before the TaskGroup
            assert self._bound is not None
            await asyncio.shield(self._bound)
            if (refused := self._refusal()) is not None:
                raise refused
        assert self._tg is not None
        tg = self._tg
        handle = WorkerHandle(
            tenant,
            self._launcher,
            self,
            self._handle_options,
            lambda coro: tg.create_task(coro),
        )
        self.table.add(tenant, handle)
        self.starts += 1
        self._events.emit(WorkerStarting(tenant))
        tg.create_task(handle.start(), name=f"corral-start-{tenant}")
        await self._wait_ready(handle)
        return handle

    async def _wait_ready(self, handle: WorkerHandle) -> None:
        """Wait for a starting worker. While anyone waits, it is pinned: not idle, so not an
        LRU victim before its first caller has had a chance to use it."""
        handle.waiters += 1
        try:
            await handle.wait_ready()
        except Exception as exc:
            if self._refusal() is not None:
                raise SupervisorClosedError("supervisor closed while the worker started") from exc
            raise
        finally:
            handle.waiters -= 1
            if handle.waiters == 0 and handle.state is WorkerState.READY and not handle.in_flight:
                # Nobody ended up calling it (cancelled, or get_or_create): idle from now.
                self.worker_idle(handle)

    def call_succeeded(self, tenant: str) -> None:
        """A call of ``tenant``'s (which had failures on record) completed: its worker
        serves again, so its failure record goes."""
        self.restarts.record_success(tenant)

    # -- evicting ----------------------------------------------------------------------------

    async def evict(self, tenant: str, reason: StopReason) -> bool:
        """Stop ``tenant``'s worker (draining calls in flight) and wait until it is gone."""
        handle = self.table.peek(tenant)
        if handle is None:
            return False
        handle.evict(reason)
        await handle.wait_dead()
        return True

    async def evict_all(self, reason: StopReason) -> int:
        handles = self.table.handles()
        for handle in handles:
            handle.evict(reason)
        for handle in handles:
            await handle.wait_dead()
        return len(handles)

    # -- HandleListener ----------------------------------------------------------------------

    def worker_idle(self, handle: WorkerHandle) -> None:
        if handle.waiters == 0:
            due = self.table.mark_idle(handle.tenant, handle)
            if self._room_waiters:  # (a call ends: usually nobody waits for room)
                self._notify_room()
            # Wake the sweeper only if this brings its next deadline forward: only the first
            # idle entry can (later ones expire later), not every call completion.
            if due is not None and due < self._sweep_due:
                self._idle_changed.set()

    def worker_used(self, handle: WorkerHandle) -> None:
        self.table.touch(handle.tenant)

    def worker_busy(self, handle: WorkerHandle) -> None:
        self.table.mark_busy(handle.tenant, handle)

    def worker_ready(self, handle: WorkerHandle) -> None:
        self._events.emit(WorkerReady(handle.tenant, handle.pid))

    def worker_dead(self, handle: WorkerHandle, report: StopReport) -> None:
        if self.table.peek(handle.tenant) is handle:
            self.table.remove(handle.tenant)
        self.stops[report.reason.value] += 1
        self._events.emit(
            WorkerStopped(
                handle.tenant,
                handle.pid,
                report.reason.value,
                report.rung.value,
                report.returncode,
            )
        )
        if report.reason in FAILURES:
            delay = self.restarts.record_failure(
                handle.tenant, f"{report.reason.value} (return code {report.returncode})"
            )
            if delay is not None:
                log.warning(
                    "tenant in backoff tenant=%s reason=%s: %.1fs after repeated failures",
                    handle.tenant,
                    report.reason.value,
                    delay,
                    extra={"tenant": handle.tenant, "reason": report.reason.value},
                )
                self._events.emit(TenantBackoff(handle.tenant, report.reason.value, delay))
        self._notify_room()

    def _notify_room(self) -> None:
        if self._room_waiters:  # (a call ends: usually nobody waits)
            self._room.set()
            self._room = asyncio.Event()

    # -- the TTL sweeper ---------------------------------------------------------------------

    async def sweep(self) -> None:
        """Stop workers idle past ``idle_ttl`` without waiting for anyone to ask (invariant 7).
        Runs until cancelled."""
        while True:
            self._idle_changed.clear()
            for tenant in self.table.expired():
                handle = self.table.peek(tenant)
                if handle is not None:
                    handle.evict(StopReason.IDLE_TTL)
            self.restarts.prune()
            due = self.table.next_expiry()
            now = self._clock()
            self._sweep_due = (
                now + _SWEEP_MAX_WAIT if due is None else min(due, now + _SWEEP_MAX_WAIT)
            )
            try:
                async with asyncio.timeout(max(0.0, self._sweep_due - now)):
                    await self._idle_changed.wait()
            except TimeoutError:
                pass
