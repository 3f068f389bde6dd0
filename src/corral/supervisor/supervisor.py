"""The public asyncio façade: :class:`Supervisor`.

Data flow::

    caller ── await sup.call(tenant, method, *args) ──▶ Supervisor._acquire
        table hit (LRU touch) ─────────────────────────▶ WorkerHandle (READY/BUSY)
        miss: backoff check → room? (else stop the LRU idle victim and wait)
              → new WorkerHandle(STARTING) in the table → start task ─▶ Launcher.spawn
        WorkerHandle.send_call: Call frame ─▶ pipe ─▶ worker loop ─▶ kernel.method()
        worker ─▶ Result | CallFailed frame ─▶ handle reader ─▶ the caller's future

The supervisor owns the table, every handle, the restart tracker and one
TaskGroup (run by a single runner task) that holds every background task:
worker starts, stop escalations, the TTL sweeper and the memory sampler.

Long because the Supervisor still owns the pool as well as the façade: room waiting,
restarts, the TTL sweeper and the memory rounds; the planned split moves them into a private
pool object and a memory watch.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar

import msgspec

from corral.errors import (
    BackoffError,
    CapacityError,
    InvalidCallError,
    MemoryPressureError,
    StartError,
    SupervisorClosedError,
)
from corral.ipc import DEFAULT_MAX_FRAME_BYTES, Start
from corral.supervisor._backoff import BackoffPolicy, RestartTracker
from corral.supervisor._config import (
    DEFAULT_ENV_ALLOWLIST,
    Factory,
    check_count,
    check_memory,
    check_seconds,
    serialise_factory,
    worker_environment,
)
from corral.supervisor._handle import HandleOptions, WorkerHandle, WorkerInfo
from corral.supervisor._lifecycle import SERVING, StopReason, StopReport, WorkerState
from corral.supervisor._memory import (
    MemoryPolicy,
    MemorySample,
    ProbeThread,
    ProcessProbe,
    ProcTreeProbe,
)
from corral.supervisor._process import Launcher, WardenLauncher
from corral.supervisor._shared import Subscription, check_method, read_events
from corral.supervisor._table import WorkerTable
from corral.supervisor.sandbox import Sandbox
from corral.supervisor.tenants import check_tenant

__all__ = ["Supervisor", "SupervisorStats", "WorkerEvent"]

_encode = msgspec.msgpack.Encoder().encode  # call arguments

_F = TypeVar("_F", bound=Callable[..., Any])


def _coroutine_function(fn: _F) -> _F:
    """Mark a plain method that returns a coroutine as a coroutine function, for whoever
    asks (``asyncio.iscoroutinefunction``, ``mock.create_autospec``, frameworks; on 3.12+
    ``inspect.iscoroutinefunction`` too)."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        return mark(fn)  # type: ignore[no-any-return]
    fn._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return fn


log = logging.getLogger("corral")


# Failures that count towards a tenant's restart intensity.
_FAILURES = frozenset(
    {
        StopReason.CRASHED,
        StopReason.START_FAILED,
        StopReason.START_TIMEOUT,
        StopReason.CALL_TIMEOUT,
        StopReason.PROTOCOL_ERROR,
        StopReason.PIPE_CLOSED,
    }
)
_SWEEP_MAX_WAIT = 30.0  # the sweeper also prunes backoff records; it wakes at least this often
_FRAME_OVERHEAD = 64  # bytes of Call envelope around the encoded arguments, generously


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class WorkerEvent(msgspec.Struct, frozen=True):
    """A lifecycle event, given to the ``on_event`` hook and to :meth:`Supervisor.events`.

    ``kind`` is one of:

    * ``"starting"``: a worker is being started for ``tenant`` (no pid yet);
    * ``"ready"``: its kernel is loaded;
    * ``"stopped"``: the process is gone; ``reason`` (a StopReason value: ``"crashed"``
      for a crash, ``"timeout"``, ``"memory_limit"``, ``"lru"``, ...), ``rung`` and
      ``returncode`` say why and how;
    * ``"backoff"``: the tenant failed too often; new calls get ``BackoffError`` for
      ``retry_after`` seconds (``reason``: the last failure).
    """

    kind: str
    tenant: str
    pid: int | None
    reason: str | None = None  # a StopReason value, e.g. "memory_limit"
    rung: str | None = None  # a Rung value, e.g. "kill"
    returncode: int | None = None
    retry_after: float | None = None  # "backoff": seconds until the tenant may start again
    at: float = msgspec.field(default_factory=time.time)  # wall-clock time of the event


class SupervisorStats(msgspec.Struct, frozen=True):
    """A snapshot of the supervisor (``Supervisor.stats()``)."""

    state: str
    max_workers: int
    workers: list[WorkerInfo]  # least recently used first
    starts: int  # workers started (spawn requested)
    stops: dict[str, int]  # StopReason value -> count
    tenants_in_backoff: int
    memory_enforcement: str  # how worker_memory_hard_limit is enforced here, or "none"
    memory_baseline: int | None  # bytes a fresh worker weighed at start (with limits set)
    memory_pressure: str | None  # what the pressure is, while it lasts
    sandbox: dict[str, str]  # layer -> "on ...", "off" or "unavailable: why" (after start)


class Supervisor:
    """Runs each tenant's kernel in a worker process of its own.

    Args:
        factory: ``"pkg.module:callable"`` or a callable; called in the worker as
            ``factory(tenant)`` and returns the kernel (or an awaitable of it).
            A callable is carried to the worker with dill.
        max_workers: live worker processes never exceed this (stopping ones count).
        idle_ttl: seconds without a call in flight before a worker is stopped,
            timed from the last completion; None = never.
        call_timeout: default seconds a call may run; a call still running then
            kills its worker. None = no limit.
        start_method: ``"forkserver"`` (fork of corral's own clean, preloaded
            warden process) or ``"spawn"`` (a fresh interpreter per worker).
        start_timeout: seconds from spawn until the kernel is loaded.
        shutdown_timeout: seconds a worker gets to run ``shutdown()`` and exit.
        term_timeout: seconds after SIGTERM before SIGKILL.
        kill_timeout: seconds after SIGKILL before corral logs an error (it keeps waiting).
        drain_timeout: seconds an evicted busy worker may finish its calls; None = the
            calls' own timeouts bound it.
        pool_timeout: seconds a call for a new tenant may wait for a free slot when every
            worker is busy; then ``CapacityError``.
        max_frame_bytes: largest message either way (arguments, results). A result may
            also decode into at most ``DECODE_BUDGET_FACTOR`` (8) times this of Python
            objects, as estimated before it is decoded (a one-byte empty list becomes
            64 bytes); a reply beyond is a protocol violation (``ProtocolError``, worker
            killed). Dense results (bytes, str, floats) fit whatever their size; a result
            of many tiny items near the cap may need a larger cap.
        restart_intensity / restart_period: failures allowed per tenant per period
            before calls are refused with ``BackoffError``.
        backoff_base / backoff_max: first and largest backoff, seconds (doubling).
        env: extra environment variables for workers (on top of ``env_allowlist``).
        env_allowlist: names copied from the host's environment into the workers'.
        worker_memory_limit: bytes (soft): a worker whose process tree's RSS is above
            this at a sample is replaced once its calls in flight finish.
        worker_memory_hard_limit: bytes (hard): enforced by the OS, so that a worker can
            never exceed it, not even between samples: a memory cgroup of its own where
            corral can make one (root), else ``RLIMIT_DATA`` (see ``memory_method``).
        min_available_memory: bytes, or a fraction of total RAM (0 < x < 1): while the
            host has less available, idle workers are stopped one at a time (least
            recently used first) and no new worker starts (``MemoryPressureError``).
        max_total_memory: bytes for all workers' trees together; same response.
        memory_method: how the hard limit is enforced: ``"auto"`` (cgroup if possible,
            else rlimit, with a warning), ``"cgroup"`` (refuse to start without one) or
            ``"rlimit"``.
        memory_check_interval: seconds between memory samples.
        on_event: called (on the event loop) with a :class:`WorkerEvent` when a worker
            becomes ready and when it is gone, with the reason. Must not block.
        sandbox: isolation for the kernels (default ``Sandbox.default()``: every layer that
            needs no privileges, where the host has it); see :class:`Sandbox`.
        launcher: where workers run (default: a local warden); a seam for other backends.
        probe: how memory is read (default: psutil).
        clock: monotonic seconds, for the table and backoff (tests inject a fake).
    """

    def __init__(
        self,
        factory: Factory,
        *,
        max_workers: int = 32,
        idle_ttl: float | None = 900.0,
        call_timeout: float | None = 30.0,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        start_timeout: float = 30.0,
        shutdown_timeout: float = 5.0,
        term_timeout: float = 2.0,
        kill_timeout: float = 5.0,
        drain_timeout: float | None = 30.0,
        pool_timeout: float = 30.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        restart_intensity: int = 5,
        restart_period: float = 60.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        env: Mapping[str, str] | None = None,
        env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST,
        worker_memory_limit: int | None = None,
        worker_memory_hard_limit: int | None = None,
        min_available_memory: float | None = None,
        max_total_memory: int | None = None,
        memory_method: Literal["auto", "cgroup", "rlimit"] = "auto",
        memory_check_interval: float = 1.0,
        on_event: Callable[[WorkerEvent], None] | None = None,
        sandbox: Sandbox | None = None,
        launcher: Launcher | None = None,
        probe: ProcessProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_count("max_workers", max_workers, minimum=1)
        check_memory(
            worker_memory_limit, worker_memory_hard_limit, min_available_memory, max_total_memory
        )
        if memory_method not in ("auto", "cgroup", "rlimit"):
            raise ValueError(
                f"memory_method must be 'auto', 'cgroup' or 'rlimit', got {memory_method!r}"
            )
        check_seconds("idle_ttl", idle_ttl, allow_none=True, allow_zero=True)
        check_seconds("call_timeout", call_timeout, allow_none=True)
        check_seconds("drain_timeout", drain_timeout, allow_none=True, allow_zero=True)
        for name, value in (
            ("start_timeout", start_timeout),
            ("shutdown_timeout", shutdown_timeout),
            ("term_timeout", term_timeout),
            ("kill_timeout", kill_timeout),
            ("memory_check_interval", memory_check_interval),
        ):
            check_seconds(name, value)
        check_seconds("pool_timeout", pool_timeout, allow_zero=True)
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {start_method!r} "
                "(workers are never forked from the host)"
            )
        if not 1024 <= max_frame_bytes <= 2**32 - 1:
            raise ValueError(f"max_frame_bytes must be in 1024..{2**32 - 1}, got {max_frame_bytes}")
        factory_ref, factory_blob = serialise_factory(factory)
        worker_env = worker_environment(env_allowlist, env)
        self._start_msg = Start(
            tenant="",
            factory=factory_ref,
            factory_blob=factory_blob,
            sys_path=[p for p in sys.path if p],
            max_frame_bytes=max_frame_bytes,
        )
        self._call_timeout = call_timeout
        self._pool_timeout = pool_timeout
        self._max_frame = max_frame_bytes
        self._memory_interval = memory_check_interval
        self._options = HandleOptions(
            start=self._start_msg,
            start_timeout=start_timeout,
            shutdown_timeout=shutdown_timeout,
            term_timeout=term_timeout,
            kill_timeout=kill_timeout,
            drain_timeout=drain_timeout,
            max_frame_bytes=max_frame_bytes,
            memory_hard_limit=worker_memory_hard_limit,
        )
        self._sandbox = sandbox if sandbox is not None else Sandbox.default()
        self._sandbox.validate()
        self._launcher: Launcher = launcher or WardenLauncher(
            exec_workers=start_method == "spawn",
            env=worker_env,
            start_timeout=start_timeout,
            memory_method=memory_method,
            sandbox=self._sandbox,
        )
        self._probe = ProbeThread(probe or ProcTreeProbe())
        self._memory = MemoryPolicy(
            soft_limit=worker_memory_limit,
            min_available=min_available_memory,
            max_total=max_total_memory,
        )
        self._hard_limit = worker_memory_hard_limit
        self._memory_baseline: int | None = None
        self._pressure_detail = ""
        # The last worker stopped for pressure (draining or stopping) until it is settled:
        # no other is chosen while it is on its way out (invariant 9).
        self._pressure_victim: WorkerHandle | None = None
        self._on_event = on_event
        self._subscriptions: list[Subscription[WorkerEvent]] = []
        self._method_names: set[str] = set()  # names already checked to be public
        self._clock = clock
        self._table: WorkerTable[WorkerHandle] = WorkerTable(max_workers, idle_ttl, clock)
        self._restarts = RestartTracker(
            BackoffPolicy(restart_intensity, restart_period, backoff_base, backoff_max), clock
        )
        self._state = _State.NEW
        self._tg: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop_runner: asyncio.Event | None = None
        self._room: asyncio.Event | None = None  # set (then replaced) when a slot may have freed
        self._room_waiters = 0  # callers waiting on _room
        self._idle_changed: asyncio.Event | None = None  # wakes the TTL sweeper early
        self._sweep_due = 0.0  # monotonic time the sweeper will next look (0: awake)
        self._closed: asyncio.Event | None = None
        self._closing: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None  # set once the TaskGroup exists
        self._starts = 0
        self._stops: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the warden process and the background tasks.

        Raises:
            SupervisorClosedError: already closing or closed.
        """
        if self._state is not _State.NEW:
            if self._state is _State.RUNNING:
                return
            raise SupervisorClosedError("this supervisor has been closed; create a new one")
        # The warden starts now, not with the first worker: a required sandbox layer or a
        # memory limit the host cannot honour fails here, and stats() can say what is in
        # force from the start.
        await self._start_launcher()
        if self._memory.soft_limit is not None or self._hard_limit is not None:
            await self._check_memory_baseline()
        loop = asyncio.get_running_loop()
        self._stop_runner = asyncio.Event()
        self._room = asyncio.Event()
        self._idle_changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._started = started = loop.create_future()
        self._runner = loop.create_task(self._run(started), name="corral-supervisor")
        # RUNNING from here: if this await is cancelled, aclose() still stops the runner
        # (it waits for ``started`` first, as does the first worker start).
        self._state = _State.RUNNING
        await asyncio.shield(started)
        if self._memory.watches_pressure:
            await self._memory_round()  # know the pressure before the first call can start one

    async def _start_launcher(self) -> None:
        """Start the launcher (the warden) now. Raises StartError, closed, if it fails."""
        try:
            await self._launcher.start()
        except Exception as exc:
            await self._abort_start()
            raise StartError(f"cannot start: {exc}", tenant="", pid=None) from exc
        except BaseException:  # cancelled: still leave nothing running
            await asyncio.shield(self._abort_start())
            raise

    async def _abort_start(self) -> None:
        """start() failed before the runner existed: release what it started."""
        await self._launcher.aclose()
        await self._probe.aclose()
        self._mark_closed()

    def _mark_closed(self) -> None:
        """CLOSED for good: readers of events() end."""
        self._state = _State.CLOSED
        for subscription in self._subscriptions:
            subscription.close()

    async def _check_memory_baseline(self) -> None:
        """Start the warden now, measure what a fresh worker weighs (a forked worker starts
        as a copy of it) and refuse limits at or below that: they would recycle every
        worker as soon as it starts. Also says how the hard limit is enforced here."""
        warden = getattr(self._launcher, "warden_pid", None)
        try:
            if warden is not None:
                sample = await self._probe.sample([warden])
                self._memory_baseline = sample.trees.get(warden)
        except Exception as exc:
            await self._abort_start()
            raise StartError(
                f"cannot measure a worker's baseline: {exc}", tenant="", pid=None
            ) from exc
        base = self._memory_baseline
        for name, limit, factor in (
            ("worker_memory_limit", self._memory.soft_limit, 1.25),
            ("worker_memory_hard_limit", self._hard_limit, 1.5),
        ):
            if limit is not None and base is not None and limit <= base * factor:
                await self._abort_start()
                raise ValueError(
                    f"{name}={limit} bytes ({limit / 2**20:.0f} MiB) is at or below a fresh "
                    f"worker's baseline ({base / 2**20:.0f} MiB measured now, x{factor} "
                    "headroom): every worker would be stopped as soon as it started"
                )
        enforcement = self._launcher.memory_enforcement
        if self._hard_limit is not None:
            if enforcement.startswith("rlimit"):
                log.warning(
                    "worker_memory_hard_limit enforced by %s; a kernel sees MemoryError and "
                    "its children are limited one by one, not together",
                    enforcement,
                )
            else:
                log.info("worker_memory_hard_limit enforced by %s", enforcement)

    async def _run(self, started: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            sweeper = tg.create_task(self._sweep(), name="corral-ttl-sweeper")
            sampler = tg.create_task(self._sample_memory(), name="corral-memory-sampler")
            started.set_result(None)
            assert self._stop_runner is not None
            await self._stop_runner.wait()
            sweeper.cancel()
            sampler.cancel()

    async def aclose(self) -> None:
        """Stop every worker (idle ones at once, busy ones after draining up to
        ``drain_timeout``), then the warden. Nothing respawns once this begins.
        Returns when every process corral started is gone.

        **Cancellation:** the shutdown goes on in the background; call again to wait for it.
        """
        if self._state is _State.NEW or self._closed is None:  # never started, or start failed
            self._mark_closed()
            return
        if self._state is not _State.RUNNING:
            await self._closed.wait()
            return
        self._state = _State.CLOSING
        self._notify_room()
        self._closing = asyncio.get_running_loop().create_task(
            self._shutdown(), name="corral-close"
        )
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        assert (
            self._closed is not None and self._stop_runner is not None and self._runner is not None
        )
        try:
            handles = self._table.handles()
            for handle in handles:
                handle.evict(StopReason.CLOSED)
            for handle in handles:
                await handle.wait_settled()
            # Every worker is gone, or was SIGKILLed long ago with no exit report (a wedged
            # warden): stopping the launcher ends the warden, and with it any such worker;
            # a warden that left kills unanswered gets no grace.
            wedged = any(handle.state is not WorkerState.DEAD for handle in handles)
            await self._launcher.aclose(grace=0.0 if wedged else 5.0)
            for handle in handles:
                await handle.wait_dead()
            await self._probe.aclose()
        finally:
            self._stop_runner.set()
            try:
                await self._runner
            finally:
                self._mark_closed()
                self._closed.set()

    async def events(self, *, buffer: int = 1024) -> AsyncIterator[WorkerEvent]:
        """Lifecycle events from now on (see :class:`WorkerEvent`), until the supervisor
        has closed. A reader more than ``buffer`` events behind loses the oldest ones
        (a slow reader must not hold memory or the supervisor back)::

            async for event in sup.events():
                if event.kind == "stopped":
                    print(event.tenant, event.reason)
        """
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer!r}")
        if self._state is _State.CLOSED:
            return
        async for event in read_events(self._subscriptions, buffer):
            yield event

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- calls -------------------------------------------------------------------------------

    @_coroutine_function
    def call(
        self, tenant: str, method: str, /, *args: Any, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """Call ``kernel.<method>(*args, **kwargs)`` in ``tenant``'s worker, starting
        it if needed, with the supervisor's ``call_timeout``.

        Returns:
            The method's return value, as msgpack carries it (Structs and dataclasses
            arrive as dicts, tuples as lists).

        Raises:
            KernelError: the kernel raised (the worker stays up).
            InvalidCallError: the tenant key breaks the rule (``corral.TENANT_RULE``);
                unknown or private method, or unencodable arguments/result.
            CallTimeoutError: the call ran past the timeout (its worker was killed).
            WorkerCrashedError: the worker died during the call.
            WorkerStoppedError: corral stopped the worker during the call.
            ProtocolError: the worker sent garbage (it was killed).
            StartError: the worker could not start.
            BackoffError: the tenant failed too often recently.
            CapacityError: no worker slot freed within ``pool_timeout``.
            SupervisorClosedError: the supervisor is closing or closed.

        A coroutine function in use (``await sup.call(...)``); written as a plain method
        that returns the coroutine, which saves a frame on the warm path.

        **Cancellation:** the call is abandoned, not interrupted: the worker finishes it
        (still bounded by the timeout) and the result is discarded.
        """
        return self._invoke(tenant, method, args, kwargs, "default")

    @_coroutine_function
    def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
    ) -> Coroutine[Any, Any, Any]:
        """Like :meth:`call`, with explicit arguments and a per-call ``timeout``
        (seconds, or None for no limit)."""
        return self._invoke(tenant, method, args, kwargs, timeout)

    async def _invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: Mapping[str, Any] | None,
        timeout: float | Literal["default"] | None,
    ) -> Any:
        if timeout == "default":
            timeout_s = self._call_timeout  # checked at construction
        else:
            timeout_s = timeout
            if timeout_s is not None:
                check_seconds("timeout", timeout_s)
        if type(tenant) is not str:
            check_tenant(tenant)  # a str is checked on the way to a worker (below)
        if method not in self._method_names:  # checked once per name
            check_method(method, self._method_names)
        try:
            payload = _encode((args, {} if kwargs is None else kwargs))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidCallError(f"arguments for {method!r} cannot be sent: {exc}") from exc
        if len(payload) + _FRAME_OVERHEAD > self._max_frame:
            raise InvalidCallError(
                f"arguments for {method!r} are {len(payload)} bytes, "
                f"over max_frame_bytes={self._max_frame}"
            )
        # The warm path: a serving worker, no await. A key in the table passed
        # check_tenant when its worker started; _acquire checks any other.
        handle = self._table.get(tenant)
        while handle is None or handle.state not in SERVING:
            handle = await self._acquire(tenant)
        value = await handle.send_call(method, payload, timeout_s)
        if tenant in self._restarts.failing:
            self._restarts.record_success(tenant)
        return value

    async def get_or_create(self, tenant: str) -> WorkerInfo:
        """Start ``tenant``'s worker if it has none, and describe it.

        Raises:
            InvalidCallError: the tenant key breaks the rule (``corral.TENANT_RULE``).
            StartError, BackoffError, CapacityError, SupervisorClosedError: as for :meth:`call`.
        """
        return (await self._acquire(tenant)).info()

    async def evict(self, tenant: str) -> bool:
        """Stop ``tenant``'s worker (draining calls in flight) and wait until it is gone.

        Returns:
            True if there was a worker.

        Raises:
            InvalidCallError: the tenant key breaks the rule (``corral.TENANT_RULE``).

        **Cancellation:** the stop goes on; only the wait is abandoned.
        """
        check_tenant(tenant)
        handle = self._table.peek(tenant)
        if handle is None:
            return False
        handle.evict(StopReason.EVICTED)
        await handle.wait_dead()
        return True

    async def evict_all(self) -> int:
        """Evict every worker; returns how many there were, once all are gone."""
        handles = self._table.handles()
        for handle in handles:
            handle.evict(StopReason.EVICTED)
        for handle in handles:
            await handle.wait_dead()
        return len(handles)

    # -- introspection -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tenants with a worker, least recently used first."""
        return self._table.keys()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, tenant: object) -> bool:
        """``tenant in sup``: whether it has a worker. InvalidCallError for a key that
        breaks the rule (a caller's bug, not a tenant without a worker)."""
        check_tenant(tenant)
        return tenant in self._table

    def stats(self) -> SupervisorStats:
        """A snapshot: every worker (LRU first), start and stop counts."""
        return SupervisorStats(
            state=self._state.value,
            max_workers=self._table.max_workers,
            workers=[h.info() for h in self._table.handles()],
            starts=self._starts,
            stops=dict(self._stops),
            tenants_in_backoff=self._restarts.in_backoff(),
            memory_enforcement=(
                self._launcher.memory_enforcement if self._hard_limit is not None else "none"
            ),
            memory_baseline=self._memory_baseline,
            memory_pressure=self._pressure_detail or None,
            sandbox=self._launcher.sandbox_report,
        )

    # -- acquiring a worker ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is not _State.RUNNING:
            raise SupervisorClosedError(
                "supervisor is not running (use 'async with Supervisor(...)' or await start())"
                if self._state is _State.NEW
                else "supervisor is closing or closed"
            )

    async def _acquire(self, tenant: str) -> WorkerHandle:
        """A handle for ``tenant`` that is READY or BUSY (or was, a moment ago).
        Raises InvalidCallError for a key that breaks the rule, before anything else."""
        check_tenant(tenant)
        deadline: float | None = None
        evicted: WorkerHandle | None = None  # the victim this caller is waiting to see go
        while True:
            self._check_open()
            handle = self._table.get(tenant)
            if handle is not None:
                if handle.is_serving:
                    return handle
                if handle.state is WorkerState.STARTING:
                    await self._wait_ready(handle)
                    continue
                await handle.wait_dead()  # the old worker is on its way out: never overlap
                continue
            backoff = self._restarts.retry_after(tenant)
            if backoff is not None:
                left, level, last = backoff
                raise BackoffError(tenant, left, level, last)
            if self._memory.pressure is not None:
                raise MemoryPressureError(
                    f"no new worker for {tenant!r} while memory is short: {self._pressure_detail}",
                    reason=self._memory.pressure.value,
                    retry_after=self._memory_interval,
                )
            if self._table.has_room():
                return await self._start_worker(tenant)
            # One victim at a time per caller: while the last one is still on its way out,
            # a worker turning idle meanwhile is not stopped as well (unless that victim is
            # past all corral can do to end it: settled and still not reaped).
            if evicted is None or evicted.is_settled:
                victim = self._table.lru_victim()
                if victim is not None:
                    evicted = self._table.peek(victim)
                    assert evicted is not None
                    evicted.evict(StopReason.LRU)
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._pool_timeout
            assert self._room is not None
            room = self._room
            self._room_waiters += 1
            try:
                async with asyncio.timeout_at(deadline):
                    await room.wait()
            except TimeoutError:
                raise CapacityError(
                    f"all {self._table.max_workers} workers are busy and none became free within "
                    f"{self._pool_timeout}s (raise max_workers or pool_timeout?)"
                ) from None
            finally:
                self._room_waiters -= 1

    async def _start_worker(self, tenant: str) -> WorkerHandle:
        if self._tg is None:  # start() was cancelled before the TaskGroup existed
            assert self._started is not None
            await asyncio.shield(self._started)
            self._check_open()
        assert self._tg is not None
        tg = self._tg
        handle = WorkerHandle(
            tenant,
            self._launcher,
            self,
            self._options,
            lambda coro: tg.create_task(coro),
        )
        self._table.add(tenant, handle)
        self._starts += 1
        self._emit(WorkerEvent("starting", tenant, None))
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
            if self._state is not _State.RUNNING:
                raise SupervisorClosedError("supervisor closed while the worker started") from exc
            raise
        finally:
            handle.waiters -= 1
            if handle.waiters == 0 and handle.state is WorkerState.READY and not handle.in_flight:
                # Nobody ended up calling it (cancelled, or get_or_create): idle from now.
                self.worker_idle(handle)

    # -- HandleListener ----------------------------------------------------------------------

    def worker_idle(self, handle: WorkerHandle) -> None:
        if handle.waiters == 0:
            due = self._table.mark_idle(handle.tenant, handle)
            if self._room_waiters:  # (a call ends: usually nobody waits for room)
                self._notify_room()
            # Wake the sweeper only if this brings its next deadline forward: only the first
            # idle entry can (later ones expire later), not every call completion.
            if due is not None and due < self._sweep_due and self._idle_changed is not None:
                self._idle_changed.set()

    def worker_used(self, handle: WorkerHandle) -> None:
        self._table.touch(handle.tenant)

    def worker_busy(self, handle: WorkerHandle) -> None:
        self._table.mark_busy(handle.tenant, handle)

    def worker_ready(self, handle: WorkerHandle) -> None:
        self._emit(WorkerEvent("ready", handle.tenant, handle.pid))

    def _emit(self, event: WorkerEvent) -> None:
        for subscription in self._subscriptions:
            subscription.put(event)
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            # The hook is the host's code at a boundary; a broken hook must not break
            # the worker's bookkeeping (this runs inside the handle's callbacks).
            log.exception(
                "on_event hook raised tenant=%s", event.tenant, extra={"tenant": event.tenant}
            )

    def worker_dead(self, handle: WorkerHandle, report: StopReport) -> None:
        if self._table.peek(handle.tenant) is handle:
            self._table.remove(handle.tenant)
        self._stops[report.reason.value] += 1
        self._emit(
            WorkerEvent(
                "stopped",
                handle.tenant,
                handle.pid,
                report.reason.value,
                report.rung.value,
                report.returncode,
            )
        )
        if report.reason in _FAILURES:
            delay = self._restarts.record_failure(
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
                self._emit(
                    WorkerEvent(
                        "backoff",
                        handle.tenant,
                        None,
                        report.reason.value,
                        retry_after=delay,
                    )
                )
        self._notify_room()

    def _notify_room(self) -> None:
        if self._room is not None and self._room_waiters:  # (a call ends: usually nobody)
            self._room.set()
            self._room = asyncio.Event()

    # -- background tasks --------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Stop workers idle past ``idle_ttl`` without waiting for anyone to ask (invariant 7)."""
        assert self._idle_changed is not None
        while True:
            self._idle_changed.clear()
            for tenant in self._table.expired():
                handle = self._table.peek(tenant)
                if handle is not None:
                    handle.evict(StopReason.IDLE_TTL)
            self._restarts.prune()
            due = self._table.next_expiry()
            now = self._clock()
            self._sweep_due = (
                now + _SWEEP_MAX_WAIT if due is None else min(due, now + _SWEEP_MAX_WAIT)
            )
            try:
                async with asyncio.timeout(max(0.0, self._sweep_due - now)):
                    await self._idle_changed.wait()
            except TimeoutError:
                pass

    async def _sample_memory(self) -> None:
        """Sample every worker's tree and the host, then act: recycle workers over the soft
        limit; under pressure, stop one worker (idle LRU first, else drain the least
        recently used busy one) and sample again as soon as it is reaped. Sampling never
        pauses longer than one interval, also while a victim drains or stops; the rounds
        taken meanwhile choose no other victim (see :meth:`_memory_round`)."""
        while True:
            victim = await self._memory_round()
            if victim is not None:
                try:
                    async with asyncio.timeout(self._memory_interval):
                        await victim.wait_settled()
                    continue  # reaped: look again at once
                except TimeoutError:
                    continue  # still on its way out: sample again (it stays the one victim)
            await asyncio.sleep(self._memory_interval)

    async def _memory_round(self) -> WorkerHandle | None:
        if self._state is not _State.RUNNING:  # closing: the probe is (being) closed too
            return None
        handles = [h for h in self._table.handles() if h.pid is not None]
        if not handles and not self._memory.watches_pressure:
            return None
        try:
            # With namespaces, a worker's pid is its init's: count what is below it.
            inits = self._launcher.sandbox_report.get("namespaces", "").startswith("on")
            # Workers with a memory cgroup are measured there too: what they started is
            # counted wherever it went (the WardenLauncher's; other launchers have none).
            leaves = getattr(self._launcher, "memory_leaves", None)
            sample: MemorySample = await self._probe.sample(
                [h.pid for h in handles if h.pid],
                exclude_roots=inits,
                cgroups=leaves() if leaves is not None else None,
            )
        except Exception:
            # The probe is replaceable code at a boundary: a failing probe must not take the
            # supervisor down with it (the OS-enforced hard limit still holds).
            log.warning("memory probe failed; limits not checked this round", exc_info=True)
            return None
        by_pid = {h.pid: h for h in handles}
        for h in handles:
            if h.pid is not None:
                h.rss = sample.trees.get(h.pid, h.rss)
        for pid in self._memory.over_soft_limit(sample):
            over = by_pid.get(pid)
            if over is not None and over.is_serving:
                log.warning(
                    "worker over worker_memory_limit tenant=%s pid=%s reason=memory_limit: "
                    "uses %d MiB; replacing it",
                    over.tenant,
                    pid,
                    sample.trees[pid] // 2**20,
                    extra={"tenant": over.tenant, "pid": pid, "reason": "memory_limit"},
                )
                over.evict(StopReason.MEMORY_LIMIT)
        was = self._memory.pressure
        reason = self._memory.update_pressure(sample)
        self._pressure_detail = self._memory.describe(sample) if reason is not None else ""
        if reason is None:
            if was is not None:
                log.info("memory pressure is over")
            return None
        if was is None:
            log.warning(
                "memory pressure reason=%s: %s; stopping workers one at a time",
                reason.value,
                self._pressure_detail,
                extra={"reason": reason.value},
            )
        last = self._pressure_victim
        if last is not None and not last.is_settled:
            # One victim at a time: the next is chosen only once the last is reaped (or past
            # all corral can do to end it: SIGKILLed kill_timeout ago). Without this, a
            # victim slower to go than one interval (a long shutdown(), a drain, a busy
            # host) let every round stop one more worker before the memory they freed
            # could show in a sample.
            return last
        self._pressure_victim = None
        idle = self._table.lru_victim()
        victim: WorkerHandle | None = self._table.peek(idle) if idle is not None else None
        if victim is None:  # nobody idle: drain the least recently used busy worker
            victim = next((h for h in self._table.handles() if h.state is WorkerState.BUSY), None)
        if victim is None:
            return None
        victim.evict(reason)
        self._pressure_victim = victim
        return victim
