"""One worker process, seen from the supervisor.

A :class:`WorkerHandle` owns its process (through the launcher), its pipes, its
in-flight calls and its lifecycle state. Only its reader callback reads the
worker's pipe; calls are written by the task that sends them. Every in-flight
call is in ``_inflight`` until exactly one of these resolves it: its reply, its
deadline, or the worker's death. Nothing else completes a call future.

Everything the worker sends is untrusted: frames are size-capped and decoded
against the declared message union, replies must match an outstanding id, and
anything else kills the worker (``ProtocolError``).

What its end means is decided elsewhere: the state table and the record of the stop
(reason, rung, outcome) are :mod:`corral.supervisor._lifecycle`'s, the words and the
errors :mod:`corral.supervisor._outcomes`'s; this module acts (signals, pipes, futures).

Long because one worker's whole life has one owner here: its start, the books of its
calls (send, reply, deadline), the pipe reader on the warm path and the stop's escalation.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, Protocol

import msgspec

from corral._text import one_line
from corral.errors import (
    CallTimeoutError,
    InvalidCallError,
    KernelError,
    MemoryLimitError,
    ResultTypeError,
    StartError,
)
from corral.ipc import (
    DECODE_BUDGET_FACTOR,
    PROTOCOL_VERSION,
    Bind,
    Call,
    CallFailed,
    FrameDecoder,
    FromWorker,
    Hello,
    ProtocolViolation,
    Result,
    Shutdown,
    Start,
    StartFailed,
    encode_frame,
    encode_frame_parts,
    frame_header,
)
from corral.supervisor._lifecycle import SERVING, Ending, Event, transition
from corral.supervisor._outcomes import call_error, exit_status, mib, start_error
from corral.supervisor._pipes import LogSink, PipeWriter
from corral.supervisor._process import Launcher, LaunchError
from corral.supervisor.records import Rung, StopReason, StopReport, WorkerInfo, WorkerState
from corral.supervisor.sandbox import Sandbox

__all__ = ["HandleListener", "HandleOptions", "WorkerHandle"]

log = logging.getLogger("corral")

_READ_CHUNK = 64 * 1024
_encode = msgspec.msgpack.Encoder().encode
_COPY_MAX = 64 * 1024  # call arguments up to this size are copied into their frame
_NIL = msgspec.Raw(b"\xc0")  # msgpack nil: the placeholder encode_frame_parts replaces
_DETAIL_MAX = 500  # characters of a worker's text quoted in a log record or error message

S = WorkerState


class HandleOptions(NamedTuple):
    """One worker's settings: the supervisor's, or its tenant's policy's where it set them
    (fixed for the worker's life)."""

    start: Start  # the Start message (tenant filled in): the factory to load
    start_timeout: float
    shutdown_timeout: float
    term_timeout: float
    kill_timeout: float
    drain_timeout: float | None
    max_frame_bytes: int
    memory_hard_limit: int | None  # bytes, enforced by the OS
    call_timeout: float | None = None  # a call's default timeout
    memory_soft_limit: int | None = None  # bytes, sampled (the memory watch acts on it)
    sandbox: Sandbox | None = None  # None: the launcher's own (the supervisor's)
    version: str = ""  # the tenant policy's label for the code it runs


class HandleListener(Protocol):
    def spare_ready(self, handle: WorkerHandle) -> None: ...
    def worker_ready(self, handle: WorkerHandle) -> None: ...
    def worker_used(self, handle: WorkerHandle) -> None: ...
    def worker_idle(self, handle: WorkerHandle) -> None: ...
    def worker_busy(self, handle: WorkerHandle) -> None: ...
    def worker_dead(self, handle: WorkerHandle, report: StopReport) -> None: ...


class _Pending(msgspec.Struct):
    future: asyncio.Future[Any]
    deadline: float | None  # loop time; None: no limit
    timeout: float | None  # seconds, for the message
    method: str
    result_type: Any  # what the reply must decode into; None: any msgpack value
    decode: Callable[[msgspec.Raw], Any]  # the reply's value bytes -> the caller's value


_decode_any = msgspec.msgpack.Decoder().decode


class WorkerHandle:
    """Owns one worker process for one tenant.

    Args:
        tenant: the tenant key; "" for a spare, which is spawned and waits for
            :meth:`bind` to give it its tenant (and its ``Start``).
        launcher: starts and signals the process.
        listener: told when the worker becomes idle, busy, or dead.
        options: timeouts, limits and the Start message template.
        spawn_task: runs a background coroutine in the supervisor's TaskGroup.
    """

    def __init__(
        self,
        tenant: str,
        launcher: Launcher,
        listener: HandleListener,
        options: HandleOptions,
        spawn_task: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.tenant = tenant
        self.state = S.STARTING
        self.pid: int | None = None
        self.kernel_pid: int | None = None  # the host pid of the kernel's process (Hello)
        self.rss: int | None = None
        self.requests = 0
        self.started_at = time.monotonic()
        self.last_used = self.started_at
        self.waiters = 0  # callers waiting for READY; the pool pins the worker meanwhile
        self.ending = Ending()  # how it ends: reason, rung, outcome (see _lifecycle)
        self._launcher = launcher
        self._listener = listener
        self._opts = options
        self._spawn_task = spawn_task
        self._loop = asyncio.get_running_loop()
        # The loop's clock and futures; asyncio's own are time.monotonic and asyncio.Future,
        # called here without the loop method's frame.
        standard = type(self._loop).time is asyncio.BaseEventLoop.time
        self._loop_time: Callable[[], float] = time.monotonic if standard else self._loop.time
        self._new_future: Callable[[], asyncio.Future[Any]] = (
            functools.partial(asyncio.Future, loop=self._loop)
            if type(self._loop).create_future is asyncio.BaseEventLoop.create_future
            else self._loop.create_future
        )
        self._ids = itertools.count(1)
        self._inflight: dict[int, _Pending] = {}
        # A reply may decode into DECODE_BUDGET_FACTOR x max_frame_bytes of objects at most
        # (msgpack lets a byte stand for a 64-byte list): beyond, a protocol violation.
        self._decoder: FrameDecoder[FromWorker] = FrameDecoder(
            FromWorker,
            max_frame_bytes=options.max_frame_bytes,
            max_decoded_bytes=DECODE_BUDGET_FACTOR * options.max_frame_bytes,
        )
        self._writer: PipeWriter | None = None
        self._reader_fd = -1
        self._log: LogSink | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._ready.add_done_callback(_consume_exception)
        self._dead = asyncio.Event()
        self._settled = asyncio.Event()  # set when is_settled becomes true
        self._timer: asyncio.TimerHandle | None = None  # start or drain deadline
        # One timer for every call's deadline, not one per call: armed at a deadline no
        # later than the earliest pending one; when it fires, expired calls are timed out
        # and it is armed again for the earliest left. Steady state costs no timer work.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = math.inf
        self._stopping: asyncio.Task[None] | None = None

    # -- queries -----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def is_serving(self) -> bool:
        """True if new calls may be sent (READY or BUSY)."""
        return self.state in SERVING

    @property
    def is_settled(self) -> bool:
        """Reaped, or SIGKILLed ``kill_timeout`` ago and still not reaped (a wedged
        warden): nothing more will come of waiting for it (see :meth:`wait_settled`)."""
        return self.state is S.DEAD or self.ending.kill_unanswered

    @property
    def stop_reason(self) -> StopReason | None:
        """Why corral stops it, once decided."""
        return self.ending.reason

    @property
    def report(self) -> StopReport | None:
        """How it ended, once reaped."""
        return self.ending.report

    def info(self) -> WorkerInfo:
        offset = time.time() - time.monotonic()
        return WorkerInfo(
            tenant=self.tenant,
            pid=self.pid,
            state=self.state.value,
            rss=self.rss,
            requests=self.requests,
            in_flight=len(self._inflight),
            started_at=self.started_at + offset,
            last_used=self.last_used + offset,
            stop_reason=self.stop_reason.value if self.stop_reason else None,
            kernel_pid=self.kernel_pid,
            version=self._opts.version,
        )

    async def wait_ready(self) -> None:
        """Wait until READY. Raises the start error (the same one for every waiter).

        **Cancellation:** only this waiter stops waiting; the start goes on.
        """
        await asyncio.shield(self._ready)

    async def wait_settled(self) -> None:
        """Wait until the process is reaped, or corral has done all it can to end it
        (SIGKILL sent ``kill_timeout`` ago, and still no exit report)."""
        await self._settled.wait()

    async def wait_dead(self) -> StopReport:
        """Wait until the process has been reaped.

        **Cancellation:** only this waiter stops waiting; the stop goes on.
        """
        await self._dead.wait()
        assert self.ending.report is not None
        return self.ending.report

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the process and send ``Start``; READY comes with the worker's ``Hello``.
        Runs as a task in the supervisor's TaskGroup; never raises."""
        try:
            # start_timeout covers the spawn too: a wedged warden must not hold callers.
            async with asyncio.timeout(self._opts.start_timeout):
                proc = await self._launcher.spawn(
                    self._on_exit, self._opts.memory_hard_limit, self._opts.sandbox
                )
        except (TimeoutError, LaunchError) as exc:
            why = (
                f"the launcher did not start the process within {self._opts.start_timeout}s"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            self.ending.start_failed(
                StopReason.LAUNCH_FAILED,
                StartError(
                    f"could not start a worker for {self.tenant!r}: {why}",
                    tenant=self.tenant,
                    pid=None,
                ),
            )
            self._on_exit(None, False)
            return
        except BaseException as exc:
            # A bug (or cancellation): waiters must not hang on it; then let it propagate.
            self.ending.start_failed(
                StopReason.LAUNCH_FAILED,
                StartError(
                    f"internal error while starting a worker for {self.tenant!r}: {exc!r}",
                    tenant=self.tenant,
                    pid=None,
                ),
            )
            self._on_exit(None, False)
            raise
        self.pid = proc.pid
        if self.state is S.DEAD:
            # It was reaped before we got here (the warden's spawn and exit reports came
            # in one read): nothing to talk to, only our pipe ends to close.
            for fd in (proc.to_worker, proc.from_worker, proc.log):
                os.close(fd)
            return
        self._writer = PipeWriter(proc.to_worker, self._loop, self._on_eof)
        self._reader_fd = proc.from_worker
        self._loop.add_reader(proc.from_worker, self._on_readable)
        self._log = LogSink(proc.log, self.tenant, proc.pid, self._loop)
        if self.state is S.STOPPING:  # evicted (or closed) while the launcher worked
            self._begin_stop(Rung.KILL)
            return
        self._send_start()

    @property
    def is_spare(self) -> bool:
        """Spawned for no tenant yet (see :meth:`bind`)."""
        return not self.tenant

    @property
    def options(self) -> HandleOptions:
        return self._opts

    @property
    def call_timeout(self) -> float | None:
        """A call's default timeout on this worker (its tenant's policy's, or the
        supervisor's)."""
        return self._opts.call_timeout

    def bind(self, tenant: str, options: HandleOptions | None = None) -> None:
        """Give a spare its tenant: ``Bind`` goes out now, and the factory it loaded at
        its ``Start`` is called for the tenant; READY comes with its ``Hello``, within
        ``start_timeout`` from now.

        The caller must have checked that it is a spare, spawned (``pid`` set) and still
        STARTING."""
        assert self.is_spare and self.state is S.STARTING and self._writer is not None
        assert self.kernel_pid is not None, "a spare is bound once it has said Hello"
        if options is not None:
            # Only what the process does not hold may differ (the pool gives a spare only
            # to tenants whose policy leaves factory, sandbox and hard limit alone).
            held = (self._opts.start, self._opts.sandbox, self._opts.memory_hard_limit)
            assert (options.start, options.sandbox, options.memory_hard_limit) == held
            self._opts = options
        self.tenant = tenant
        self.started_at = self.last_used = time.monotonic()
        if self._log is not None:
            self._log.tenant = tenant
        self._writer.write(encode_frame(Bind(tenant)))
        self._timer = self._loop.call_later(self._opts.start_timeout, self._on_start_timeout)

    def _send_start(self) -> None:
        """``Start`` (for a spare, with no tenant: it loads the factory, says Hello and
        waits for its Bind). ``start_timeout`` runs until the (first) Hello."""
        assert self._writer is not None
        start = msgspec.structs.replace(self._opts.start, tenant=self.tenant)
        self._writer.write(encode_frame(start))
        self._timer = self._loop.call_later(self._opts.start_timeout, self._on_start_timeout)
        log.debug(
            "worker starting tenant=%s pid=%s",
            self.tenant,
            self.pid,
            extra={"tenant": self.tenant, "pid": self.pid},
        )

    def _on_start_timeout(self) -> None:
        self._timer = None
        if self.state is S.STARTING:
            self._fail_start(
                StopReason.START_TIMEOUT,
                f"did not become ready within {self._opts.start_timeout}s "
                "(a hang while importing the kernel or in its factory?)",
            )

    def _fail_start(self, reason: StopReason, why: str, **remote: str | None) -> None:
        error = StartError(
            f"worker for {self.tenant!r} (pid {self.pid}) failed to start: {why}",
            tenant=self.tenant,
            pid=self.pid,
            **remote,
        )
        self.ending.start_failed(reason, error)
        transition(self, Event.START_FAILED)
        self._begin_stop(Rung.KILL if reason is not StopReason.START_FAILED else Rung.ASK)

    # -- calls -------------------------------------------------------------------------------

    def send_call(
        self,
        method: str,
        payload: bytes,
        timeout: float | None,
        result_type: Any = None,
        decode: Callable[[msgspec.Raw], Any] = _decode_any,
    ) -> asyncio.Future[Any]:
        """Send one call; the returned future resolves exactly once (see module doc):
        with the reply decoded by ``decode`` (strictly into ``result_type``, if given;
        a reply that does not fit fails the call with ResultTypeError, and the worker
        serves on).

        The caller must have checked :attr:`is_serving`.
        """
        assert self._writer is not None and self.state in SERVING, self.state
        call_id = next(self._ids)
        if len(payload) > _COPY_MAX:  # large arguments go out by reference, not copied
            head, tail = encode_frame_parts(Call(call_id, method, _NIL), payload)
        else:
            body = _encode(Call(call_id, method, msgspec.Raw(payload)))  # encode_frame,
            head, tail = frame_header(len(body)) + body, b""  # inline: a frame less a call
        # Written first, booked after: the worker starts on it while the books are kept
        # (its reply is read only once this returns to the loop). A pipe found broken
        # here is reported from the loop later: the call, booked below, fails with it.
        if self._inflight:  # calls in a burst: one writev at the end of it
            self._writer.write_soon(head)
            if tail:
                self._writer.write_soon(tail)
        elif tail:
            self._writer.write(head, tail)
        else:
            self._writer.write(head)
        fut: asyncio.Future[Any] = self._new_future()
        self.last_used = now = time.monotonic()
        deadline = None
        if timeout is not None:
            deadline = (now if self._loop_time is time.monotonic else self._loop_time()) + timeout
            if deadline < self._watchdog_at:
                self._arm_watchdog(deadline)
        self._inflight[call_id] = _Pending(fut, deadline, timeout, method, result_type, decode)
        if self.state is S.READY:
            self.state = S.BUSY  # = transition(self, Event.CALL_SENT): _lifecycle.WARM_SEND
            self._listener.worker_busy(self)
        return fut

    def _arm_watchdog(self, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(when, self._on_watchdog)
        self._watchdog_at = when

    def _disarm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = None
        self._watchdog_at = math.inf

    def _on_watchdog(self) -> None:
        self._watchdog, self._watchdog_at = None, math.inf
        now = self._loop.time()
        expired = [
            call_id
            for call_id, p in self._inflight.items()
            if p.deadline is not None and p.deadline <= now
        ]
        for call_id in expired:
            self._on_call_timeout(call_id)
        deadlines = [p.deadline for p in self._inflight.values() if p.deadline is not None]
        if deadlines and self.state is not S.DEAD:
            self._arm_watchdog(min(deadlines))

    def _on_call_timeout(self, call_id: int) -> None:
        pending = self._inflight.pop(call_id, None)
        if pending is None:
            return
        error = CallTimeoutError(
            f"{self.tenant!r}.{pending.method} did not finish within {pending.timeout}s; "
            f"its worker (pid {self.pid}) was killed",
            tenant=self.tenant,
            pid=self.pid,
        )
        _resolve(pending, error=error)
        self._kill(
            StopReason.CALL_TIMEOUT, f"a call to {pending.method} ran past {pending.timeout}s"
        )

    def _complete(self, call_id: int) -> _Pending | None:
        pending = self._inflight.pop(call_id, None)
        if pending is not None:
            self._completed(1)
        return pending

    def _completed(self, count: int) -> None:
        """``count`` calls were answered (and taken out of ``_inflight``)."""
        self.requests += count
        self.last_used = time.monotonic()
        # Most recently used from this moment, before any caller resumes: the LRU order
        # is exact whenever one looks (the idle mark below may come an iteration later).
        self._listener.worker_used(self)
        if not self._inflight:
            if self.state is S.BUSY:
                self.state = S.READY  # = transition(self, Event.ALL_REPLIED): WARM_REPLY
                # The table's idle mark waits for the tasks these replies wake: a caller
                # that sends its next call at once never takes the worker through it.
                self._loop.call_soon(self._idle_now)
            elif self.state is S.DRAINING:
                transition(self, Event.ALL_REPLIED)
                self._begin_stop(Rung.ASK)

    def _idle_now(self) -> None:
        """Idle in the table (an LRU victim, TTL running) if still READY with nothing in
        flight one loop iteration after its last reply."""
        if self.state is S.READY and not self._inflight:
            self._listener.worker_idle(self)

    # -- reading the worker's pipe -----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._reader_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_eof()
            return
        try:
            msgs = self._decoder.feed(data)
        except ProtocolViolation as exc:
            self._protocol_violation(f"sent a malformed frame: {exc}")
            return
        inflight, replied = self._inflight, 0
        killed = self._being_killed()
        for msg in msgs:
            if killed:
                break  # late messages are of no use to anyone
            if type(msg) is Result and msg.id in inflight:  # the usual reply, inline
                pending = inflight.pop(msg.id)
                replied += 1
                if not pending.future.done():  # the caller may have been cancelled
                    try:
                        value = pending.decode(msg.value)
                    except msgspec.ValidationError as exc:  # not the result_type asked for
                        pending.future.set_exception(self._result_type_error(pending, exc))
                    except msgspec.DecodeError as exc:  # not msgpack (bad UTF-8, ...)
                        inflight[msg.id] = pending  # it fails with the others, below
                        replied -= 1
                        self._protocol_violation(f"sent an undecodable result: {exc}")
                        killed = True
                    else:  # (the future's callbacks run later: no state change here)
                        pending.future.set_result(value)
            else:
                self._on_message(msg)
                killed = self._being_killed()
        if replied:  # the bookkeeping of _complete, once for the whole read
            self._completed(replied)

    def _result_type_error(self, pending: _Pending, exc: Exception) -> ResultTypeError:
        return ResultTypeError(
            tenant=self.tenant,
            pid=self.pid,
            method=pending.method,
            result_type=pending.result_type,
            detail=str(exc),
        )

    def _being_killed(self) -> bool:
        return (self.state is S.STOPPING and self.ending.rung is Rung.KILL) or self.state is S.DEAD

    def _on_message(self, msg: FromWorker) -> None:
        if isinstance(msg, Result):  # (a known id was handled in _on_readable)
            self._protocol_violation(f"replied to unknown call id {msg.id}")
        elif isinstance(msg, CallFailed):
            pending = self._complete(msg.id)
            if pending is None:
                self._protocol_violation(f"reported failure of unknown call id {msg.id}")
                return
            err = msg.error
            error: Exception
            if (
                msg.kind == "kernel"
                and err.type_name == "builtins.MemoryError"
                and self._opts.memory_hard_limit is not None
            ):
                # Under an rlimit the limit shows up as MemoryError: the worker may be in no
                # state to go on (half-built objects), so it is replaced after draining.
                error = MemoryLimitError(
                    f"{self.tenant!r}.{pending.method}: worker pid {self.pid} ran out of memory "
                    f"at worker_memory_hard_limit ({mib(self._opts.memory_hard_limit)}); "
                    "it is being replaced",
                    tenant=self.tenant,
                    pid=self.pid,
                    limit=self._opts.memory_hard_limit,
                )
                self.evict(StopReason.MEMORY_HARD_LIMIT)
            elif msg.kind == "kernel":
                error = KernelError(
                    tenant=self.tenant,
                    pid=self.pid,
                    method=pending.method,
                    remote_type=err.type_name,
                    remote_message=err.message,
                    remote_traceback=err.traceback,
                )
            else:
                error = InvalidCallError(
                    f"{self.tenant!r}.{pending.method}: {one_line(err.message, _DETAIL_MAX)}",
                    kind=msg.kind,
                )
            _resolve(pending, error=error)
        elif (
            isinstance(msg, Hello)
            and self.state is S.STARTING
            and (self.tenant or self.kernel_pid is None)
        ):  # (a spare says Hello once before it is bound: a second one is a violation)
            if msg.protocol_version != PROTOCOL_VERSION:
                self._fail_start(
                    StopReason.START_FAILED,
                    f"protocol version {msg.protocol_version}, expected {PROTOCOL_VERSION}",
                )
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.kernel_pid is None:  # (a spare's first Hello says it)
                self.kernel_pid = msg.host_pid if msg.host_pid is not None else self.pid
            if not self.tenant:  # a spare has loaded its factory: it waits for a tenant
                self._listener.spare_ready(self)
                return
            transition(self, Event.HELLO_RECEIVED)
            self._ready.set_result(None)
            log.info(
                "worker ready tenant=%s pid=%s",
                self.tenant,
                self.pid,
                extra={"tenant": self.tenant, "pid": self.pid},
            )
            self._listener.worker_ready(self)
            self._listener.worker_idle(self)
        elif isinstance(msg, StartFailed) and self.state is S.STARTING:
            e = msg.error
            self._fail_start(
                StopReason.START_FAILED,
                f"the factory raised {one_line(e.type_name, _DETAIL_MAX)}: "
                f"{one_line(e.message, _DETAIL_MAX)}",
                remote_type=e.type_name,
                remote_traceback=e.traceback,
            )
        else:
            self._protocol_violation(f"sent {type(msg).__name__} while {self.state.value}")

    def _on_eof(self) -> None:
        """Its reply pipe hit EOF, or its request pipe broke."""
        if self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
        if self.state is S.STOPPING or self.state is S.DEAD:
            return
        # Either it is exiting (the warden will report how) or it closed the pipe and lives
        # on uselessly. Kill it: an exit status that came first is not changed by this.
        if self.state is S.STARTING:
            self.ending.start_failed(StopReason.START_FAILED, None)
        self.ending.lost_pipe()
        log.debug(
            "worker pipe closed tenant=%s pid=%s; making sure it is gone",
            self.tenant,
            self.pid,
            extra={"tenant": self.tenant, "pid": self.pid},
        )
        self._kill(None, None)

    def _protocol_violation(self, what: str) -> None:
        # ``what`` may quote the worker's bytes (msgspec names the value it refused): one
        # line, bounded, in the log record and in every caller's ProtocolError.
        what = one_line(what, _DETAIL_MAX)
        self.ending.misbehaved(what)
        log.warning(
            "worker protocol violation tenant=%s pid=%s: %s",
            self.tenant,
            self.pid,
            what,
            extra={"tenant": self.tenant, "pid": self.pid},
        )
        self._kill(StopReason.PROTOCOL_ERROR, what)

    # -- stopping ----------------------------------------------------------------------------

    def evict(self, reason: StopReason) -> None:
        """Ask the worker to go: stop now if idle or starting, drain first if busy.
        A no-op if it is already on its way out."""
        if self.state in (S.STOPPING, S.DEAD, S.DRAINING):
            return
        self.ending.decide(reason)
        if self.state is S.BUSY:
            transition(self, Event.EVICTED)
            if self._opts.drain_timeout is not None:
                self._timer = self._loop.call_later(
                    self._opts.drain_timeout, self._on_drain_timeout
                )
            log.info(
                "worker draining tenant=%s pid=%s reason=%s",
                self.tenant,
                self.pid,
                reason.value,
                extra={"tenant": self.tenant, "pid": self.pid, "reason": reason.value},
            )
            return
        was_starting = self.state is S.STARTING
        transition(self, Event.EVICTED)
        if was_starting:
            if self.pid is None:
                return  # start() notices STOPPING once the launcher returns
            self._begin_stop(Rung.KILL)
        else:
            self._begin_stop(Rung.ASK)

    def _on_drain_timeout(self) -> None:
        self._timer = None
        if self.state is S.DRAINING:
            transition(self, Event.DRAIN_TIMED_OUT)
            self._begin_stop(Rung.TERM)

    def _kill(self, reason: StopReason | None, why: str | None) -> None:
        """Stop at the kill rung (the worker cannot be trusted to stop itself)."""
        if self.state is S.DEAD:
            return
        if self.state is S.STOPPING:
            if self.pid is not None:
                self.ending.climb(Rung.KILL)
                self._launcher.signal(self.pid, signal.SIGKILL)
            return
        if reason is not None:
            self.ending.decide(reason)
        if why is not None:
            log.warning(
                "killing worker tenant=%s pid=%s: %s",
                self.tenant,
                self.pid,
                why,
                extra={"tenant": self.tenant, "pid": self.pid},
            )
        transition(self, Event.KILL_REQUESTED)
        self._begin_stop(Rung.KILL)

    def _begin_stop(self, first: Rung) -> None:
        """Start climbing the termination rungs in a background task (the caller may be
        cancelled; the stop is not). The first signal is sent synchronously."""
        self._listener.worker_busy(self)  # not idle, not a victim any more
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopping is not None or self.pid is None:
            return
        if first is Rung.KILL:
            self.ending.climb(Rung.KILL)
            self._launcher.signal(self.pid, signal.SIGKILL)
        self._stopping = self._spawn_task(self._climb(first))

    async def _climb(self, first: Rung) -> None:
        assert self.pid is not None
        pid = self.pid
        if first is Rung.ASK:
            self.ending.climb(Rung.ASK)
            if self._writer is not None:
                self._writer.write(encode_frame(Shutdown()))
            if await self._wait_dead(self._opts.shutdown_timeout):
                return
            first = Rung.TERM
        if first is Rung.TERM:
            self.ending.climb(Rung.TERM)
            self._launcher.signal(pid, signal.SIGTERM)
            if await self._wait_dead(self._opts.term_timeout):
                return
            self.ending.climb(Rung.KILL)
            self._launcher.signal(pid, signal.SIGKILL)
        if not await self._wait_dead(self._opts.kill_timeout):
            log.error(
                "worker still not reaped tenant=%s pid=%s: %.1fs after SIGKILL "
                "(uninterruptible sleep?)",
                self.tenant,
                pid,
                self._opts.kill_timeout,
                extra={"tenant": self.tenant, "pid": pid},
            )
            self.ending.kill_went_unanswered()
            self._settled.set()
            await self._dead.wait()

    async def _wait_dead(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._dead.wait()
        except TimeoutError:
            return False
        return True

    # -- death -------------------------------------------------------------------------------

    def _on_exit(self, returncode: int | None, oom_killed: bool) -> None:
        """The launcher reaped the process (or lost it). Resolves everything left."""
        if self.state is S.DEAD:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_fds()
        report = self.ending.close(returncode, oom_killed)
        transition(self, Event.PROCESS_EXITED)
        limit = self._opts.memory_hard_limit
        status = exit_status(report, oom_killed=oom_killed, memory_hard_limit=limit)
        if not self._ready.done():  # it never became ready: its start waiters learn why
            self._ready.set_exception(
                self.ending.start_error
                or start_error(
                    report, status, tenant=self.tenant, pid=self.pid, detail=self.ending.detail
                )
            )
        inflight, self._inflight = self._inflight, {}
        self._disarm_watchdog()
        for pending in inflight.values():
            error = call_error(
                report,
                status,
                tenant=self.tenant,
                pid=self.pid,
                method=pending.method,
                detail=self.ending.detail,
                memory_hard_limit=limit,
            )
            _resolve(pending, error=error)
        reason = report.reason
        level = (
            logging.DEBUG  # a spare: the pool says it in its own words
            if self.is_spare
            else logging.INFO
            if reason not in (StopReason.CRASHED, StopReason.PROTOCOL_ERROR)
            else logging.WARNING
        )
        # "(reason, rung)" for people, the fields for whoever parses the line; the
        # status is corral's own words (no worker text), so it may follow.
        log.log(
            level,
            "worker stopped (%s, %s) tenant=%s pid=%s reason=%s: %s",
            reason.value,
            report.rung.value,
            self.tenant,
            self.pid,
            reason.value,
            status,
            extra={"tenant": self.tenant, "pid": self.pid, "reason": reason.value},
        )
        self._dead.set()
        self._settled.set()
        self._listener.worker_dead(self, report)

    def _close_fds(self) -> None:
        if self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
            os.close(self._reader_fd)
            self._reader_fd = -1
        if self._writer is not None:
            self._writer.close()
        if self._log is not None:
            self._log.close()


def _resolve(pending: _Pending, *, result: Any = None, error: BaseException | None = None) -> None:
    if pending.future.done():  # the caller was cancelled; nobody is waiting
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(result)


def _consume_exception(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
