"""The public asyncio façade: :class:`Supervisor`.

Data flow::

    caller ── await sup.call(tenant, method, *args) ──▶ Supervisor._invoke
        pool.table hit (LRU touch) ──────────────────────▶ WorkerHandle (READY/BUSY)
        miss: Pool.acquire: backoff? memory admits? room? (else stop the LRU idle
              victim and wait) → new WorkerHandle(STARTING) → start task ─▶ Launcher.spawn
        WorkerHandle.send_call: Call frame ─▶ pipe ─▶ worker loop ─▶ kernel.method()
        worker ─▶ Result | CallFailed frame ─▶ handle reader ─▶ the caller's future

The Supervisor checks its options, builds the parts and runs one TaskGroup (in a
single runner task) that holds every background task: worker starts, stop
escalations, the TTL sweeper and the memory watch. It owns only its own state (new,
running, closing, closed); the workers are the pool's (:mod:`corral.supervisor._pool`),
memory is the watch's (:mod:`corral.supervisor._memwatch`), events the hub's
(:mod:`corral.supervisor.events`).

Long because it is the whole public API, each method with the docstring users read,
and call/invoke are typed twice (with and without ``result_type``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal, TypeVar, overload

import msgspec

from corral.errors import CorralError, InvalidCallError, StartError, SupervisorClosedError
from corral.ipc import Start
from corral.supervisor._backoff import BackoffPolicy
from corral.supervisor._config import (
    Factory,
    check_seconds,
    serialise_factory,
    worker_environment,
)
from corral.supervisor._handle import HandleOptions
from corral.supervisor._lifecycle import SERVING
from corral.supervisor._memory import MemoryPolicy, ProbeThread, ProcessProbe, ProcTreeProbe
from corral.supervisor._memwatch import MemoryWatch
from corral.supervisor._pool import Pool
from corral.supervisor._process import Launcher, WardenLauncher
from corral.supervisor._shared import ResultDecoders, check_method
from corral.supervisor.events import EventHub, WorkerEvent
from corral.supervisor.options import SupervisorOptions
from corral.supervisor.policy import Policy
from corral.supervisor.records import StopReason, SupervisorStats, WorkerInfo
from corral.supervisor.sandbox import Sandbox
from corral.supervisor.tenants import check_tenant

__all__ = ["Supervisor"]

_encode = msgspec.msgpack.Encoder().encode  # call arguments

log = logging.getLogger("corral")

_FRAME_OVERHEAD = 64  # bytes of Call envelope around the encoded arguments, generously

T = TypeVar("T")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Supervisor:
    """Runs each tenant's kernel in a worker process of its own.

    Args:
        factory: ``"pkg.module:callable"`` or a callable; called in the worker as
            ``factory(tenant)`` and returns the kernel (or an awaitable of it).
            A callable is carried to the worker with dill.
        options: the data options (limits, timeouts, sandbox, ...): a
            :class:`~corral.SupervisorOptions`, each option declared and documented
            there once. Default: its defaults.
        on_event: called (on the event loop) with a :data:`~corral.WorkerEvent` when a
            worker starts, becomes ready, is gone (with the reason), or its tenant goes
            into backoff. Must not block.
        policy: ``policy(tenant) -> TenantPolicy``: what a tenant's workers get that
            differs from these options (factory, timeouts, memory limits, sandbox, read
            paths, a version); called (sync) each time a worker is activated for it.
        launcher: where workers run (default: a local warden); a seam for other backends.
        probe: how memory is read (default: psutil).
        clock: monotonic seconds, for the table and backoff (tests inject a fake).
        **overrides: any option of :class:`~corral.SupervisorOptions` by name, on top of
            ``options`` (``Supervisor(f, max_workers=8, idle_ttl=60)``).

    Raises:
        ValueError: an option out of range (the message names it).
        TypeError: an unknown option, or a factory dill cannot carry.
    """

    def __init__(
        self,
        factory: Factory,
        options: SupervisorOptions | None = None,
        *,
        on_event: Callable[[WorkerEvent], None] | None = None,
        policy: Policy | None = None,
        launcher: Launcher | None = None,
        probe: ProcessProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> None:
        if options is None:
            opts = SupervisorOptions(**overrides)
        elif not isinstance(options, SupervisorOptions):
            raise TypeError(f"options must be a SupervisorOptions, got {type(options).__name__}")
        else:
            opts = options.with_(**overrides) if overrides else options
        self.options = opts  # the options in force (a frozen Struct: read-only)
        factory_ref, factory_blob = serialise_factory(factory)
        worker_env = worker_environment(opts.env_allowlist, opts.env)
        start_msg = Start(
            tenant="",
            factory=factory_ref,
            factory_blob=factory_blob,
            sys_path=[p for p in sys.path if p],
            max_frame_bytes=opts.max_frame_bytes,
        )
        self._max_frame = opts.max_frame_bytes
        self._method_names: set[str] = set()  # names already checked to be public
        self._decoders = ResultDecoders()  # result_type -> its strict decoder
        # A hard limit may be set here or by tenants' policies: say how it is enforced.
        self._hard_limits = opts.worker_memory_hard_limit is not None or policy is not None
        sandbox = opts.sandbox if opts.sandbox is not None else Sandbox.default()
        self._launcher: Launcher = launcher or WardenLauncher(
            exec_workers=opts.start_method == "spawn",
            env=worker_env,
            start_timeout=opts.start_timeout,
            memory_method=opts.memory_method,
            sandbox=sandbox,
        )
        self._events = EventHub(on_event)
        self._pool = Pool(
            launcher=self._launcher,
            handle_options=HandleOptions(
                start=start_msg,
                start_timeout=opts.start_timeout,
                shutdown_timeout=opts.shutdown_timeout,
                term_timeout=opts.term_timeout,
                kill_timeout=opts.kill_timeout,
                drain_timeout=opts.drain_timeout,
                max_frame_bytes=opts.max_frame_bytes,
                memory_hard_limit=opts.worker_memory_hard_limit,
                call_timeout=opts.call_timeout,
                memory_soft_limit=opts.worker_memory_limit,
            ),
            max_workers=opts.max_workers,
            idle_ttl=opts.idle_ttl,
            pool_timeout=opts.pool_timeout,
            spare_workers=opts.spare_workers,
            backoff=BackoffPolicy(
                opts.restart_intensity, opts.restart_period, opts.backoff_base, opts.backoff_max
            ),
            policy=policy,
            sandbox=sandbox,
            events=self._events,
            refusal=self._refusal,
            admit=self._admit,
            check_limits=self._check_limits,
            clock=clock,
        )
        self._table = self._pool.table  # read on the warm path
        self._failing = self._pool.restarts.failing  # read on the warm path
        self._memory = MemoryWatch(
            probe=ProbeThread(probe or ProcTreeProbe()),
            policy=MemoryPolicy(
                soft_limit=opts.worker_memory_limit,
                min_available=opts.min_available_memory,
                max_total=opts.max_total_memory,
            ),
            hard_limit=opts.worker_memory_hard_limit,
            interval=opts.memory_check_interval,
            launcher=self._launcher,
            pool=self._pool,
            tenant_limits=policy is not None,
        )
        self._state = _State.NEW
        self._runner: asyncio.Task[None] | None = None
        self._stop_runner: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._closing: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the warden process, the background tasks and the spares (``spare_workers``:
        ready when this returns).

        Raises:
            SupervisorClosedError: already closing or closed.
            StartError: the warden could not start, or a required sandbox layer or
                memory limit is not available here.
            ValueError: a memory limit at or below what a fresh worker weighs.
        """
        if self._state is not _State.NEW:
            if self._state is _State.RUNNING:
                return
            raise SupervisorClosedError("this supervisor has been closed; create a new one")
        # The warden starts now, not with the first worker: a required sandbox layer or a
        # memory limit the host cannot honour fails here, and stats() can say what is in
        # force from the start.
        try:
            try:
                await self._launcher.start()
            except Exception as exc:
                raise StartError(f"cannot start: {exc}", tenant="", pid=None) from exc
            await self._memory.start()
        except BaseException:  # (cancelled too: still leave nothing running)
            await asyncio.shield(self._abort_start())
            raise
        loop = asyncio.get_running_loop()
        self._stop_runner = asyncio.Event()
        self._closed = asyncio.Event()
        self._pool.expect_task_group()
        started = loop.create_future()
        self._runner = loop.create_task(self._run(started), name="corral-supervisor")
        # RUNNING from here: if this await is cancelled, aclose() still stops the runner
        # (it waits for the TaskGroup first, as does the first worker start).
        self._state = _State.RUNNING
        await asyncio.shield(started)
        # The spares asked for are ready when this returns (one that fails to start is
        # logged, not raised: calls start workers the usual way meanwhile).
        await self._pool.spares_started()

    async def _abort_start(self) -> None:
        """start() failed before the runner existed: release what it started."""
        await self._launcher.aclose()
        await self._memory.aclose()
        self._mark_closed()

    def _mark_closed(self) -> None:
        """CLOSED for good: readers of events() end."""
        self._state = _State.CLOSED
        self._events.close()

    async def _run(self, started: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as tg:
            self._pool.bind(tg)
            sweeper = tg.create_task(self._pool.sweep(), name="corral-ttl-sweeper")
            sampler = tg.create_task(self._memory.run(), name="corral-memory-watch")
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
        self._memory.halt()
        self._pool.wake_all()
        self._closing = asyncio.get_running_loop().create_task(
            self._shutdown(), name="corral-close"
        )
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        assert (
            self._closed is not None and self._stop_runner is not None and self._runner is not None
        )
        try:
            handles = await self._pool.stop_all(StopReason.CLOSED)
            # Every worker is gone, or was SIGKILLed long ago with no exit report (a wedged
            # warden): stopping the launcher ends the warden, and with it any such worker;
            # a warden that left kills unanswered gets no grace.
            wedged = any(handle.report is None for handle in handles)
            await self._launcher.aclose(grace=0.0 if wedged else 5.0)
            for handle in handles:
                await handle.wait_dead()
            await self._memory.aclose()
        finally:
            self._stop_runner.set()
            try:
                await self._runner
            finally:
                self._mark_closed()
                self._closed.set()

    async def events(self, *, buffer: int = 1024) -> AsyncIterator[WorkerEvent]:
        """Lifecycle events from now on (see :data:`~corral.WorkerEvent`), until the
        supervisor has closed. A reader more than ``buffer`` events behind loses the
        oldest ones (a slow reader must not hold memory or the supervisor back)::

            async for event in sup.events():
                if event.kind == "stopped":
                    print(event.tenant, event.reason)
        """
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer!r}")
        async for event in self._events.read(buffer):
            yield event

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _refusal(self) -> SupervisorClosedError | None:
        """Why a call is refused now (not started, closing or closed), or None."""
        if self._state is _State.RUNNING:
            return None
        return SupervisorClosedError(
            "supervisor is not running (use 'async with Supervisor(...)' or await start())"
            if self._state is _State.NEW
            else "supervisor is closing or closed"
        )

    def _admit(self, tenant: str) -> None:
        self._memory.admit(tenant)

    def _check_limits(self, soft: int | None, hard: int | None) -> None:
        self._memory.check_limits(soft, hard)

    # -- calls -------------------------------------------------------------------------------

    @overload
    async def call(
        self, tenant: str, method: str, /, *args: Any, result_type: type[T], **kwargs: Any
    ) -> T: ...

    @overload
    async def call(
        self, tenant: str, method: str, /, *args: Any, result_type: Any = None, **kwargs: Any
    ) -> Any: ...

    async def call(
        self, tenant: str, method: str, /, *args: Any, result_type: Any = None, **kwargs: Any
    ) -> Any:
        """Call ``kernel.<method>(*args, **kwargs)`` in ``tenant``'s worker, starting
        it if needed, with the supervisor's ``call_timeout``.

        ``result_type`` (keyword only, so not a kernel argument): any type msgspec
        decodes into (a Struct, dataclass, TypedDict, union, ``Annotated`` constraint,
        ``list[int]``, ...). The reply is decoded strictly into it, straight from its
        bytes; one that does not fit raises ResultTypeError and the worker serves on.

        Returns:
            The method's return value: as msgpack carries it (Structs and dataclasses
            arrive as dicts, tuples as lists), or a ``result_type``.

        Raises:
            KernelError: the kernel raised (the worker stays up).
            ResultTypeError: the reply does not fit ``result_type`` (the worker stays up).
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

        **Cancellation:** the call is abandoned, not interrupted: the worker finishes it
        (still bounded by the timeout) and the result is discarded.
        """
        payload = self._payload(tenant, method, args, kwargs)
        decode = None if result_type is None else self._decoders.get(result_type)
        # The warm path: a serving worker, no await. A key in the table passed
        # check_tenant when its worker started; the pool checks any other.
        handle = self._table.get(tenant)
        while handle is None or handle.state not in SERVING:
            handle = await self._pool.acquire(tenant)
        if decode is None:
            value = await handle.send_call(method, payload, handle.call_timeout)
        else:
            value = await handle.send_call(
                method, payload, handle.call_timeout, result_type, decode
            )
        if tenant in self._failing:  # (a set lookup on the warm path)
            self._pool.call_succeeded(tenant)
        return value

    @overload
    async def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
        result_type: type[T],
    ) -> T: ...

    @overload
    async def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
        result_type: Any = None,
    ) -> Any: ...

    async def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
        result_type: Any = None,
    ) -> Any:
        """Like :meth:`call`, with explicit arguments, a per-call ``timeout`` (seconds,
        or None for no limit; "default": the tenant's policy's, else ``call_timeout``)
        and ``result_type``."""
        if timeout != "default" and timeout is not None:
            check_seconds("timeout", timeout)
        payload = self._payload(tenant, method, args, kwargs)
        decode = None if result_type is None else self._decoders.get(result_type)
        handle = self._table.get(tenant)  # (as in call)
        while handle is None or handle.state not in SERVING:
            handle = await self._pool.acquire(tenant)
        if timeout == "default":
            timeout = handle.call_timeout
        if decode is None:
            value = await handle.send_call(method, payload, timeout)
        else:
            value = await handle.send_call(method, payload, timeout, result_type, decode)
        if tenant in self._failing:  # (a set lookup on the warm path)
            self._pool.call_succeeded(tenant)
        return value

    def _payload(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: Mapping[str, Any] | None,
    ) -> bytes:
        """Check what a call names and encode its arguments (refused before any worker
        sees them)."""
        if type(tenant) is not str:
            check_tenant(tenant)  # a str is checked on the way to a worker
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
        return payload

    async def get_or_create(self, tenant: str) -> WorkerInfo:
        """Start ``tenant``'s worker if it has none, and describe it.

        Raises:
            InvalidCallError: the tenant key breaks the rule (``corral.TENANT_RULE``).
            StartError, BackoffError, CapacityError, SupervisorClosedError: as for :meth:`call`.
        """
        return (await self._pool.acquire(tenant)).info()

    async def evict(self, tenant: str) -> bool:
        """Stop ``tenant``'s worker (draining calls in flight) and wait until it is gone.

        Returns:
            True if there was a worker.

        Raises:
            InvalidCallError: the tenant key breaks the rule (``corral.TENANT_RULE``).

        **Cancellation:** the stop goes on; only the wait is abandoned.
        """
        check_tenant(tenant)
        return await self._pool.evict(tenant, StopReason.EVICTED)

    async def reload(self, tenant: str) -> WorkerInfo | None:
        """Replace ``tenant``'s worker with one started anew (its policy asked again: a new
        ``version``, factory or limits take effect): new calls go to the new worker once
        it is ready, while the old one finishes its calls in flight (its stop reason:
        ``"reloaded"``). No call fails because of a reload.

        With a free slot (``max_workers``) the new worker starts beside the old one, which
        serves meanwhile; if it fails to start, the old one serves on and its error is
        raised. With none, the old one drains first and the new one starts after it
        (calls meanwhile wait for it, as for any start; if it then fails to start, they
        and this caller get its error, as for any start).

        Returns:
            The new worker, or None if ``tenant`` had no worker (nothing to reload).

        Raises:
            InvalidCallError: the tenant key breaks the rule.
            StartError: the new worker failed to start (with a free slot, the old one
                still serves).
            SupervisorClosedError, BackoffError, CapacityError, MemoryPressureError: as
                for :meth:`call`.
        """
        handle = await self._pool.reload(tenant)
        return handle.info() if handle is not None else None

    async def reload_all(self) -> dict[str, WorkerInfo | CorralError]:
        """:meth:`reload` every tenant with a worker, all at once; returns each tenant's
        new worker, or the error that left its old one serving."""
        tenants = self.keys()
        outcomes = await asyncio.gather(
            *(self._pool.reload(tenant) for tenant in tenants), return_exceptions=True
        )
        result: dict[str, WorkerInfo | CorralError] = {}
        for tenant, outcome in zip(tenants, outcomes, strict=True):
            if isinstance(outcome, CorralError):
                result[tenant] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            elif outcome is not None:
                result[tenant] = outcome.info()
        return result

    async def evict_all(self) -> int:
        """Evict every worker; returns how many there were, once all are gone."""
        return await self._pool.evict_all(StopReason.EVICTED)

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
        """A snapshot: every worker (LRU first), start and stop counts, memory and
        sandbox."""
        return SupervisorStats(
            state=self._state.value,
            max_workers=self._table.max_workers,
            workers=[h.info() for h in (*self._table.handles(), *self._pool.retiring())],
            starts=self._pool.starts,
            stops=dict(self._pool.stops),
            tenants_in_backoff=self._pool.restarts.in_backoff(),
            memory_enforcement=(self._launcher.memory_enforcement if self._hard_limits else "none"),
            memory_baseline=self._memory.baseline,
            memory_pressure=self._memory.pressure_detail or None,
            sandbox=self._launcher.sandbox_report,
            spares=self._pool.spare_pids(),
        )
