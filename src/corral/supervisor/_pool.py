"""The pool: which tenants have a worker, and everything that decides it.

:class:`Pool` owns the tenant table (LRU and idle orders), waiting for room when
``max_workers`` are taken, restart backoff, the TTL sweeper, the start and stop
counts, and the handles' callbacks (it is their :class:`HandleListener`): a tenant
key goes ``Supervisor`` -> ``Pool.acquire`` -> table / backoff -> a new
``WorkerHandle``, and the handle's news comes back here only. The public façade
(:mod:`corral.supervisor.supervisor`) reads ``pool.table`` on the warm path and asks
the pool for everything else. The memory watch (:mod:`corral.supervisor._memwatch`)
chooses victims from ``pool.table`` and gates new workers through ``admit``.

Long because spares and reloads are the pool's too: workers not (yet) in the table,
counted against ``max_workers`` with the others, each with its own path into it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections import Counter
from collections.abc import Callable

import msgspec

from corral.errors import BackoffError, CapacityError, StartError, SupervisorClosedError
from corral.supervisor._backoff import BackoffPolicy, RestartTracker
from corral.supervisor._config import serialise_factory
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
from corral.supervisor.policy import Policy, TenantPolicy, pick
from corral.supervisor.records import StopReason, StopReport, WorkerState
from corral.supervisor.sandbox import Sandbox
from corral.supervisor.tenants import check_tenant

__all__ = ["Pool"]

log = logging.getLogger("corral")

_SWEEP_MAX_WAIT = 30.0  # the sweeper also prunes backoff records; it wakes at least this often


class _Turns:
    """One tenant's reloads, taken one at a time: the lock, and how many hold or want it."""

    __slots__ = ("lock", "wanted")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.wanted = 0


class Pool:
    """The workers of one supervisor, by tenant.

    Args:
        launcher: starts the processes.
        handle_options: timeouts, limits and the Start message for every handle.
        max_workers / idle_ttl / pool_timeout / spare_workers: as the Supervisor's
            options.
        backoff: restart intensity and backoff.
        events: where lifecycle events go.
        refusal: the error a call gets now because the supervisor is not running (not
            started, closing or closed), or None while it is.
        admit: raises (MemoryPressureError) if no new worker may start now.
        check_limits: raises ValueError for memory limits (soft, hard) at or below what a
            fresh worker weighs.
        policy: ``policy(tenant) -> TenantPolicy``, called once per activation; None:
            every tenant gets ``handle_options``.
        sandbox: the supervisor's sandbox (a tenant's ``extra_read_paths`` extend it).
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
        spare_workers: int,
        backoff: BackoffPolicy,
        policy: Policy | None,
        sandbox: Sandbox,
        events: EventHub,
        refusal: Callable[[], SupervisorClosedError | None],
        admit: Callable[[str], None],
        check_limits: Callable[[int | None, int | None], None],
        clock: Callable[[], float],
    ) -> None:
        self.table: WorkerTable[WorkerHandle] = WorkerTable(max_workers, idle_ttl, clock)
        self.restarts = RestartTracker(backoff, clock)
        self.starts = 0
        self.stops: Counter[str] = Counter()
        self._launcher = launcher
        self._handle_options = handle_options
        self._pool_timeout = pool_timeout
        self._spare_workers = spare_workers
        self._policy = policy
        self._sandbox = sandbox
        self._reloading: set[WorkerHandle] = set()  # new workers of reloads, not yet swapped in
        # Workers on their way out that the table no longer lists (a reload's old worker,
        # a dropped spare): they count against max_workers and memory until reaped.
        self._retiring: set[WorkerHandle] = set()
        self._reloads: dict[str, _Turns] = {}  # one reload at a time per tenant
        # Spares: spawned for no tenant. Ready ones wait for bind(); all count as workers.
        self._spares: collections.deque[WorkerHandle] = collections.deque()
        self._spares_starting: set[WorkerHandle] = set()
        self._spares_settled = asyncio.Event()  # set while no spare is starting
        self._spares_settled.set()
        self._events = events
        self._refusal = refusal
        self._admit = admit
        self._check_limits = check_limits
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
        """Run workers' background tasks (starts, stop escalations) in ``tg``, and start
        the spares."""
        self._tg = tg
        if self._bound is not None and not self._bound.done():
            self._bound.set_result(None)
        self.refill()

    @property
    def spares(self) -> int:
        """Spares started or starting (each counts as a worker)."""
        return len(self._spares) + len(self._spares_starting)

    def spare_pids(self) -> list[int]:
        """The pids of the spares ready to be taken, next taken first."""
        return [h.pid for h in self._spares if h.pid is not None]

    async def spares_started(self) -> None:
        """Wait until no spare is starting (each is ready, or failed and gone)."""
        await self._spares_settled.wait()

    def handles(self) -> list[WorkerHandle]:
        """Every live worker: the tenants' (LRU first), the reloads' new ones, the spares."""
        return [
            *self.table.handles(),
            *self._reloading,
            *self._retiring,
            *self._spares,
            *self._spares_starting,
        ]

    def retiring(self) -> list[WorkerHandle]:
        """Workers a reload replaced, still finishing their calls (not in the table)."""
        return [h for h in self._retiring if not h.is_spare]

    def _ready_spare(self) -> WorkerHandle | None:
        """Take the next spare still waiting for its tenant (one whose pipe closed is on
        its way out, and stays listed until it is reaped)."""
        for spare in self._spares:
            if spare.state is WorkerState.STARTING:
                self._spares.remove(spare)
                return spare
        return None

    def _has_room(self) -> bool:
        live = len(self.table) + len(self._reloading) + len(self._retiring) + self.spares
        return live < self.table.max_workers

    def wake_all(self) -> None:
        """The supervisor is closing: callers waiting for room look again (and leave)."""
        self._notify_room()

    async def stop_all(self, reason: StopReason) -> list[WorkerHandle]:
        """Stop every worker (busy ones drain first) and wait until each is settled.
        Returns the handles, for the caller to wait for their deaths."""
        handles = self.handles()
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
        activation: tuple[HandleOptions, bool] | None = None  # the policy's, once asked
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
            if activation is None and (self._spares or self._has_room()):
                activation = self._activate(tenant)  # (asked once, however long this waits)
            if activation is not None:
                options, spare_fits = activation
                if spare_fits and (spare := self._ready_spare()) is not None:
                    return await self._start_worker(tenant, options, spare)
                if self._has_room():
                    return await self._start_worker(tenant, options, None)
            # One victim at a time per caller: while the last one is still on its way out,
            # a worker turning idle meanwhile is not stopped as well (unless that victim is
            # past all corral can do to end it: settled and still not reaped). None while
            # a spare this tenant can use is on its way: it will do. A ready spare it
            # cannot use (its policy's factory or sandbox differ) goes before any tenant.
            spare_coming = self._spares_starting and (activation is None or activation[1])
            if not spare_coming and (evicted is None or evicted.is_settled):
                evicted = self.drop_spare(StopReason.LRU)
                victim = self.table.lru_victim() if evicted is None else None
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

    async def _start_worker(
        self, tenant: str, options: HandleOptions, spare: WorkerHandle | None
    ) -> WorkerHandle:
        """A worker for ``tenant`` with ``options``: ``spare`` given its tenant, or a new
        one."""
        if spare is not None:
            handle = spare
            handle.bind(tenant, options)
            self.table.add(tenant, handle)
        else:
            tg = await self._task_group()
            handle = self._new_handle(tenant, tg, options)
            self.table.add(tenant, handle)
            tg.create_task(handle.start(), name=f"corral-start-{tenant}")
        self.starts += 1
        self._events.emit(WorkerStarting(tenant))
        try:
            await self._wait_ready(handle)
        finally:
            if spare is not None:  # its replacement, once it no longer competes with it
                self.refill()
        return handle

    async def _task_group(self) -> asyncio.TaskGroup:
        if self._tg is None:  # the supervisor's start was cancelled before the TaskGroup
            assert self._bound is not None
            await asyncio.shield(self._bound)
            if (refused := self._refusal()) is not None:
                raise refused
        assert self._tg is not None
        return self._tg

    def _new_handle(
        self, tenant: str, tg: asyncio.TaskGroup, options: HandleOptions | None = None
    ) -> WorkerHandle:
        return WorkerHandle(
            tenant,
            self._launcher,
            self,
            self._handle_options if options is None else options,
            lambda coro: tg.create_task(coro),
        )

    def _activate(self, tenant: str) -> tuple[HandleOptions, bool]:
        """The settings of a new worker for ``tenant`` (the supervisor's, with what its
        policy sets), and whether a spare may serve it (one loaded the supervisor's
        factory in the supervisor's sandbox).

        Raises:
            StartError: the policy raised, or returned something else than a TenantPolicy.
        """
        if self._policy is None:
            return self._handle_options, True
        try:
            policy = self._policy(tenant)
        except Exception as exc:
            raise StartError(
                f"policy({tenant!r}) raised {type(exc).__name__}: {exc}", tenant=tenant, pid=None
            ) from exc
        if not isinstance(policy, TenantPolicy):
            raise StartError(
                f"policy({tenant!r}) returned {type(policy).__name__}, not a TenantPolicy",
                tenant=tenant,
                pid=None,
            )
        base = self._handle_options
        start = base.start
        if policy.factory is not None:
            ref, blob = serialise_factory(policy.factory)
            start = msgspec.structs.replace(start, factory=ref, factory_blob=blob)
        sandbox = policy.sandbox
        if policy.extra_read_paths:
            inner = sandbox or self._sandbox
            paths = (*inner.extra_read_paths, *policy.extra_read_paths)
            sandbox = msgspec.structs.replace(inner, extra_read_paths=paths)
        options = base._replace(
            start=start,
            call_timeout=pick(policy.call_timeout, base.call_timeout),
            memory_soft_limit=pick(policy.worker_memory_limit, base.memory_soft_limit),
            memory_hard_limit=pick(policy.worker_memory_hard_limit, base.memory_hard_limit),
            sandbox=sandbox,
            version=policy.version,
        )
        if options.memory_soft_limit is not base.memory_soft_limit or (
            options.memory_hard_limit is not base.memory_hard_limit
        ):
            try:
                self._check_limits(options.memory_soft_limit, options.memory_hard_limit)
            except ValueError as exc:
                raise StartError(f"policy({tenant!r}): {exc}", tenant=tenant, pid=None) from None
        return options, policy.is_default

    def refill(self) -> None:
        """Start spares until there are ``spare_workers`` (or no room, or memory is short,
        or a caller waits for the room, or the supervisor is not running)."""
        tg = self._tg
        while (
            self.spares < self._spare_workers
            and tg is not None
            and self._refusal() is None
            and not self._room_waiters
            and self._has_room()
            and self._admits_spare()
        ):
            handle = self._new_handle("", tg)
            self._spares_starting.add(handle)
            self._spares_settled.clear()
            tg.create_task(handle.start(), name="corral-start-spare")

    def _admits_spare(self) -> bool:
        try:
            self._admit("a spare")
        except Exception:  # (memory is short: no spare now)
            return False
        return True

    def drop_spare(self, reason: StopReason) -> WorkerHandle | None:
        """Stop one ready spare (memory is short); returns it, or None if there is none."""
        if not self._spares:
            return None
        handle = self._spares.pop()
        self._retiring.add(handle)  # (counted until it is reaped)
        handle.evict(reason)
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

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self, tenant: str) -> WorkerHandle | None:
        """Replace ``tenant``'s worker with one started anew (its policy asked again):
        new calls go to the new one once it is ready, the old one drains. None if the
        tenant has no worker.

        With room for one more worker, the new one starts beside the old, which serves
        meanwhile: if it fails to start, the old one serves on and the error is raised.
        Without room, the old one drains first and the new one starts after it (calls
        meanwhile wait for it, as for any start; if it fails to start, they and the
        caller get its error, as for any start).

        Raises:
            StartError: the new worker failed to start (with room: the old one still
                serves).
            SupervisorClosedError, BackoffError, CapacityError, MemoryPressureError: as
                for a start.
        """
        check_tenant(tenant)
        turn = self._reloads.get(tenant)
        if turn is None:
            turn = self._reloads[tenant] = _Turns()
        turn.wanted += 1
        try:
            async with turn.lock:
                return await self._reload(tenant)
        finally:
            turn.wanted -= 1
            if not turn.wanted:  # (nobody holds or waits for it: kept no longer)
                del self._reloads[tenant]

    async def _reload(self, tenant: str) -> WorkerHandle | None:
        if (refused := self._refusal()) is not None:
            raise refused
        old = self.table.peek(tenant)
        if old is None:
            return None
        if not old.is_serving:  # starting (it will have the policy of now) or stopping
            return await self.acquire(tenant)
        self._admit(tenant)
        if not self._has_room():  # no slot for both: drain the old one, then start anew
            old.evict(StopReason.RELOADED)
            return await self.acquire(tenant)
        options, _ = self._activate(tenant)
        tg = await self._task_group()
        new = self._new_handle(tenant, tg, options)
        self._reloading.add(new)
        self.starts += 1
        self._events.emit(WorkerStarting(tenant))
        tg.create_task(new.start(), name=f"corral-reload-{tenant}")
        try:
            await new.wait_ready()  # (its start error is the caller's; the old one serves)
        except BaseException:
            # Failed, or the caller was cancelled: a new worker still on its way is stopped
            # and counted until reaped, never left serving nobody.
            self._reloading.discard(new)
            if new.state is not WorkerState.DEAD:
                self._retiring.add(new)
                new.evict(StopReason.RELOADED)
            raise
        self._reloading.discard(new)
        current = self.table.peek(tenant)
        if current is old:
            self.table.replace(tenant, new)
            self._retiring.add(old)
            old.evict(StopReason.RELOADED)  # its calls in flight finish; new ones come here
        elif current is None:  # the old one went meanwhile
            self.table.add(tenant, new)
        else:  # another worker took the tenant meanwhile: it stays
            self._retiring.add(new)
            new.evict(StopReason.RELOADED)
            return current
        if new.state is WorkerState.READY and not new.in_flight:
            self.worker_idle(new)
        self.refill()
        return new

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

    def spare_ready(self, handle: WorkerHandle) -> None:
        self._spare_started(handle)
        self._spares.append(handle)
        self._notify_room()

    def _spare_started(self, handle: WorkerHandle) -> None:
        self._spares_starting.discard(handle)
        if not self._spares_starting:
            self._spares_settled.set()

    def worker_ready(self, handle: WorkerHandle) -> None:
        self._events.emit(WorkerReady(handle.tenant, handle.pid))

    def worker_dead(self, handle: WorkerHandle, report: StopReport) -> None:
        self.stops[report.reason.value] += 1
        self._retiring.discard(handle)
        if handle.is_spare:  # never bound: no tenant to tell, nothing to count against one
            self._spare_started(handle)
            if handle in self._spares:
                self._spares.remove(handle)
            log.log(
                logging.INFO if report.reason not in FAILURES else logging.WARNING,
                "spare worker stopped pid=%s reason=%s",
                handle.pid,
                report.reason.value,
                extra={"pid": handle.pid, "reason": report.reason.value},
            )
            self._notify_room()
            return
        if self.table.peek(handle.tenant) is handle:
            self.table.remove(handle.tenant)
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
        self.refill()

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
