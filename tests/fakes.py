"""In-memory workers behind the real :class:`~corral.supervisor._process.Launcher`
protocol: the pool's behaviour (LRU, TTL, backoff, room, single-flight, stops, events)
tested in milliseconds, with no process, no thread and no sandbox.

:class:`FakeLauncher` is what a :class:`~corral.Supervisor` gets as ``launcher=``. Its
``spawn`` makes three real pipes and returns a fake pid (from :data:`FAKE_PID_BASE` up:
above Linux's largest ``pid_max``, so never a real process), and starts a
:class:`FakeWorker`: a task on the test's event loop that speaks the real frame
protocol at the other end of the pipes. It reads ``Start``, builds the tenant's kernel
(``launcher.factory(tenant)``, in-process: the supervisor's own factory string is not
imported), says ``Hello``, answers each ``Call`` with ``Result`` or ``CallFailed`` (sync
methods in order, ``async def`` ones as concurrent tasks, as the real worker loop does)
and exits 0 on ``Shutdown`` (after the kernel's ``shutdown()``) or on EOF. A signal
ends it with ``-signum``. Every exit is reported once, through ``on_exit``, from the
loop (never from inside ``signal()``) after the loop's next poll, so that the supervisor
reads EOF on its pipe first, as it usually does with a real warden's report.

Scripting:

* per tenant, :meth:`FakeLauncher.script`: a start that hangs, fails (as if the factory
  raised) or exits with a code before ``Hello``; a worker that ignores ``Shutdown`` or
  SIGTERM (each stop rung in turn);
* launcher-wide: :attr:`FakeLauncher.spawn_error` (every spawn raises ``LaunchError``),
  :meth:`FakeLauncher.hold_spawns` (spawns wait until :meth:`FakeLauncher.release_spawns`),
  ``start_error`` (``start()`` raises ``LaunchError``);
* from the kernel: a method raises :class:`WorkerExit` to end its worker with an exit
  code (the fake's ``os._exit``), or waits at a :class:`Gate` (``hold(name)``) until the
  test opens it; from the test: :meth:`FakeWorker.exit` (a crash from outside),
  :meth:`FakeWorker.send_raw` (bytes of the test's choosing: a protocol violation).

Waiting: :meth:`FakeLauncher.wait_for` wakes on every change (spawn, ``Start`` read,
``Hello`` sent, exit reported), under a deadline; :meth:`FakeLauncher.started` is the
common case. :meth:`FakeLauncher.aclose` ends every worker and returns once each exit
is reported and every task it started has finished, with every fd it opened closed
(the supervisor closes its own ends when it hears of the exit).

Not modelled: memory (``memory_enforcement`` is ``"none"``; give the supervisor a long
``memory_check_interval``), sandboxes, the warden, process groups, real signals'
timing. The contract with real processes stays in the other test modules.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import signal
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from corral import Sandbox, Supervisor
from corral.ipc import (
    PROTOCOL_VERSION,
    Call,
    CallFailed,
    ErrorKind,
    FrameDecoder,
    Hello,
    ProtocolViolation,
    Result,
    Shutdown,
    Start,
    StartFailed,
    ToWorker,
    encode_frame,
)
from corral.ipc.framing import MAX_FRAME_LIMIT
from corral.supervisor._process import ExitCallback, LaunchError, SpawnedProcess
from corral.supervisor.records import LayerStatus
from corral.worker._loop import remote_error

if TYPE_CHECKING:
    from corral.supervisor._process import Launcher

__all__ = [
    "FAKE_FAST",
    "FAKE_PID_BASE",
    "FakeKernel",
    "FakeLauncher",
    "FakeWorker",
    "Gate",
    "Script",
    "WorkerExit",
    "fake_supervisor",
]

FAKE_PID_BASE = 10**7
"""The first fake pid. Linux's pid_max is at most 2**22: no real process has one."""

FAKE_FAST: dict[str, Any] = {
    "start_timeout": 2.0,
    "shutdown_timeout": 1.0,
    "term_timeout": 1.0,
    "kill_timeout": 1.0,
    "memory_check_interval": 3600.0,  # the memory watch samples nothing (no real pids)
}
"""Options for a supervisor of fake workers: nothing waits long, no memory sampling."""

_READ_CHUNK = 64 * 1024
_args = msgspec.msgpack.Decoder(tuple[list[Any], dict[str, Any]])  # Call.args, as the worker's


def fake_supervisor(launcher: FakeLauncher, **options: Any) -> Supervisor:
    """A :class:`Supervisor` whose workers are ``launcher``'s, with :data:`FAKE_FAST`
    (``options`` override it) and no sandbox. Not started."""
    settings: dict[str, Any] = {"sandbox": Sandbox.none(), **FAKE_FAST, **options}
    # The factory string is carried in Start (see FakeWorker.start) but not imported:
    # launcher.factory builds the kernels.
    return Supervisor("tests.fakes:FakeKernel", launcher=launcher, **settings)


class WorkerExit(BaseException):
    """Raised by a kernel method (or factory): its worker exits with ``code`` at once,
    without a reply, as ``os._exit(code)`` would end a real one. A BaseException, so that
    a kernel's ``except Exception`` does not stop it."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Gate:
    """A point where calls wait (``FakeKernel.hold``) until the test opens it.

    ``entered`` is set once a call is waiting here; :meth:`open` lets every waiting
    and later call through."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.waiting = 0
        self._open = asyncio.Event()

    async def wait_entered(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self.entered.wait()

    def open(self) -> None:
        self._open.set()

    async def pass_through(self) -> None:
        self.waiting += 1
        self.entered.set()
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1


class FakeKernel:
    """The default kernel of a fake worker: a few plain methods, a gate to hold calls
    at, and a crash. ``gates`` is the launcher's (shared by every worker)."""

    def __init__(self, tenant: str, gates: defaultdict[str, Gate] | None = None) -> None:
        self.tenant = tenant
        self.calls = 0
        self.shut_down = False
        self._gates = gates if gates is not None else defaultdict(Gate)

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def crash(self, code: int = 3) -> None:
        raise WorkerExit(code)

    async def async_echo(self, value: Any) -> Any:
        return value

    async def hold(self, name: str) -> str:
        """Wait at gate ``name`` until the test opens it."""
        await self._gates[name].pass_through()
        return f"released {name}"

    def shutdown(self) -> None:
        self.shut_down = True


@dataclass(frozen=True)
class Script:
    """How a tenant's workers behave (:meth:`FakeLauncher.script`).

    Attributes:
        start: ``"ok"``; ``"hang"`` (never says Hello); ``"fail"`` (StartFailed, as if
            the factory raised, then exit 1); or an exit code (exits before Hello).
        ignore_shutdown: the Shutdown message is ignored (the stop climbs to SIGTERM).
        ignore_term: SIGTERM is ignored (the stop climbs to SIGKILL).
    """

    start: Literal["ok", "hang", "fail"] | int = "ok"
    ignore_shutdown: bool = False
    ignore_term: bool = False


class FakeWorker:
    """One in-memory worker: a task on the loop at the far end of three real pipes.

    Attributes:
        pid: its fake pid (>= FAKE_PID_BASE).
        memory_limit: what the supervisor asked for (bytes), not enforced.
        start: the Start message, once read (None before).
        tenant: ``start.tenant``, once read.
        kernel: what the factory built, once built.
        calls: Call frames received.
        returncode: waitpid style (< 0: the signal that ended it), once it has exited.
        reported: set once ``on_exit`` has been called.
    """

    def __init__(
        self,
        launcher: FakeLauncher,
        pid: int,
        on_exit: ExitCallback,
        memory_limit: int | None,
        fds: tuple[int, int, int],  # (requests in, replies out, log out): the worker's ends
    ) -> None:
        self.pid = pid
        self.memory_limit = memory_limit
        self.start: Start | None = None
        self.tenant: str | None = None
        self.kernel: Any = None
        self.calls = 0
        self.returncode: int | None = None
        self.reported = asyncio.Event()
        self._launcher = launcher
        self._on_exit = on_exit
        self._in, self._out, self._log = fds
        self._loop = asyncio.get_running_loop()
        self._script = Script()
        self._decoder: FrameDecoder[ToWorker] = FrameDecoder(
            ToWorker, max_frame_bytes=MAX_FRAME_LIMIT
        )
        self._max_frame = MAX_FRAME_LIMIT
        self._write_lock = asyncio.Lock()
        self._ending: int | None = None  # the return code a signal or exit() decided
        self._closed = False  # its ends of the pipes are closed (their numbers may be reused)
        self._calls: set[asyncio.Task[None]] = set()
        self._task = self._loop.create_task(self._run(), name=f"fake-worker-{pid}")
        self._task.add_done_callback(self._finished)

    # -- the test's levers ---------------------------------------------------------------------

    def exit(self, code: int) -> None:
        """End it now with ``code`` (waitpid style: -9 is SIGKILL), as a crash from
        outside would; a no-op once it is exiting."""
        if self._ending is None and not self._task.done():
            self._ending = code
            self._task.cancel()

    def signal(self, signum: int) -> None:
        if signum == 0 or (signum == signal.SIGTERM and self._script.ignore_term):
            return
        self.exit(-signum)

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the supervisor as if the worker had (a bad frame, a reply to
        nobody)."""
        await self._write(data)

    # -- the worker's life -----------------------------------------------------------------------

    async def _run(self) -> int:
        try:
            return await self._life()
        except WorkerExit as exc:
            return exc.code
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except ProtocolViolation:
            return 2  # a bad frame from the supervisor, as the real loop exits
        except BrokenPipeError:
            return 1  # the supervisor closed our reply pipe: a real worker dies writing

    async def _life(self) -> int:
        msgs = await self._read()
        if not msgs or not isinstance(msgs[0], Start) or len(msgs) > 1:
            return 2  # EOF or anything but one Start first: the real loop's exit code
        start = self.start = msgs[0]
        self.tenant = start.tenant
        self._max_frame = start.max_frame_bytes
        self._script = self._launcher.script_of(start.tenant)
        self._launcher.notify()
        behaviour = self._script.start
        if behaviour == "hang":
            await asyncio.Event().wait()  # until a signal ends it
        if not isinstance(behaviour, str):
            return behaviour
        try:
            if behaviour == "fail":
                raise RuntimeError(f"scripted start failure for {start.tenant!r}")
            kernel = self._launcher.factory(start.tenant)
            if inspect.isawaitable(kernel):
                kernel = await kernel
        except Exception as exc:
            await self._write(encode_frame(StartFailed(remote_error(exc, self._max_frame))))
            return 1
        self.kernel = kernel
        await self._write(encode_frame(Hello(PROTOCOL_VERSION, self.pid, None)))
        self._launcher.notify()
        return await self._serve()

    async def _serve(self) -> int:
        while True:
            msgs = await self._read()
            if msgs is None:
                return 0  # EOF: the supervisor is gone
            for msg in msgs:
                if isinstance(msg, Call):
                    self.calls += 1
                    await self._dispatch(msg)
                elif isinstance(msg, Shutdown):
                    if self._script.ignore_shutdown:
                        continue
                    await self._shutdown_hook()
                    return 0
                else:
                    return 2  # a second Start: the real loop's "unexpected" exit

    async def _dispatch(self, call: Call) -> None:
        name = call.method
        method = None if name.startswith("_") else getattr(self.kernel, name, None)
        if not callable(method):
            why = "private" if name.startswith("_") else "not a public method of the kernel"
            await self._fail(call.id, "method", AttributeError(f"{name!r} is {why}"))
            return
        try:
            args, kwargs = _args.decode(call.args)
        except (msgspec.DecodeError, RecursionError) as exc:
            await self._fail(call.id, "arguments", exc)
            return
        try:
            value = method(*args, **kwargs)
        except Exception as exc:
            await self._fail(call.id, "kernel", exc)
            return
        if inspect.isawaitable(value):
            task = self._loop.create_task(self._await_reply(call.id, value))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            return
        await self._reply(call.id, value)

    async def _await_reply(self, call_id: int, awaitable: Any) -> None:
        try:
            value = await awaitable
        except WorkerExit as exc:
            self.exit(exc.code)
            return
        except Exception as exc:
            await self._fail(call_id, "kernel", exc)
            return
        await self._reply(call_id, value)

    async def _reply(self, call_id: int, value: Any) -> None:
        try:
            frame = encode_frame(Result(call_id, value), max_frame_bytes=self._max_frame)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            await self._fail(call_id, "result", TypeError(f"the result cannot be sent: {exc}"))
            return
        await self._write(frame)

    async def _fail(self, call_id: int, kind: ErrorKind, exc: BaseException) -> None:
        error = remote_error(exc, self._max_frame)
        await self._write(encode_frame(CallFailed(call_id, kind, error)))

    async def _shutdown_hook(self) -> None:
        hook = getattr(self.kernel, "shutdown", None)
        if callable(hook):
            try:
                outcome = hook()
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                pass  # the real worker prints it and exits 0 all the same

    # -- pipes -----------------------------------------------------------------------------------

    async def _read(self) -> list[ToWorker] | None:
        """The next messages from the supervisor; None at EOF."""
        while True:
            try:
                data = os.read(self._in, _READ_CHUNK)
            except BlockingIOError:
                await self._ready(self._in, write=False)
                continue
            if not data:
                return None
            msgs = self._decoder.feed(data)
            if msgs:
                return msgs

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:  # whole frames, never interleaved by call tasks
            view = memoryview(data)
            while view:
                if self._closed:  # exited: its fd number may be someone else's pipe now
                    raise BrokenPipeError("the fake worker has exited")
                try:
                    view = view[os.write(self._out, view) :]
                except BlockingIOError:
                    await self._ready(self._out, write=True)

    async def _ready(self, fd: int, *, write: bool) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            self._loop.add_writer(fd, wake)
        else:
            self._loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if not self._closed:  # (else removed when it closed, before the number was freed)
                if write:
                    self._loop.remove_writer(fd)
                else:
                    self._loop.remove_reader(fd)

    # -- exit ------------------------------------------------------------------------------------

    def _finished(self, task: asyncio.Task[int]) -> None:
        """The worker's task is done (also when it was cancelled before it ran a line):
        close its ends, end its calls, and report the exit from the loop."""
        if task.cancelled():
            code = self._ending if self._ending is not None else -signal.SIGKILL
        elif (error := task.exception()) is not None:
            self._launcher.failures.append(error)  # a bug in the fake or the test's kernel
            code = 1
        else:
            code = task.result()
        self.returncode = code
        for call in self._calls:
            call.cancel()
        self._launcher.track(self._calls)
        # A cancelled call may still be waiting for its pipe: unregister before closing.
        self._loop.remove_reader(self._in)
        self._loop.remove_writer(self._out)
        self._closed = True
        for fd in (self._in, self._out, self._log):
            os.close(fd)
        # Reported after the next poll, as a warden's report follows the exit: the
        # supervisor reads the EOF on its pipe first (a timer runs after that poll's I/O).
        self._loop.call_later(0, self._report)

    def _report(self) -> None:
        assert self.returncode is not None
        self._launcher.forget(self)
        self._on_exit(self.returncode, False)
        self.reported.set()
        self._launcher.notify()


class FakeLauncher:
    """A Launcher of :class:`FakeWorker` s (see the module docstring).

    Args:
        factory: ``factory(tenant)`` builds a tenant's kernel (or an awaitable of it);
            default: a :class:`FakeKernel` sharing this launcher's :attr:`gates`.
            Settable later (``launcher.factory = ...``) for workers started from then on.
        start_error: ``start()`` raises LaunchError with this message.
        sandbox_report: what ``sandbox_report`` says (default: nothing).

    Attributes:
        spawned: every worker started, in order (live and exited).
        gates: name -> :class:`Gate`, made on first use; the default kernels'.
        spawn_error: while set, every spawn raises LaunchError with this message.
        failures: exceptions that escaped a worker's task (a bug): ``aclose`` raises.
        closed: ``aclose`` has been called.
    """

    def __init__(
        self,
        factory: Callable[[str], Any] | None = None,
        *,
        start_error: str | None = None,
        sandbox_report: dict[str, LayerStatus] | None = None,
    ) -> None:
        self.gates: defaultdict[str, Gate] = defaultdict(Gate)
        self.factory: Callable[[str], Any] = factory or self._default_kernel
        self.spawned: list[FakeWorker] = []
        self.spawn_error: str | None = None
        self.failures: list[BaseException] = []
        self.closed = False
        self.sandboxes: list[Sandbox | None] = []  # each spawn's sandbox (None: the default)
        self._start_error = start_error
        self._sandbox_report = dict(sandbox_report or {})
        self._pids = itertools.count(FAKE_PID_BASE)
        self._live: dict[int, FakeWorker] = {}
        self._scripts: dict[str, Script] = {}
        self._spawns_open = asyncio.Event()
        self._spawns_open.set()
        self._changed = asyncio.Event()
        self._ended_calls: set[asyncio.Task[None]] = set()

    def _default_kernel(self, tenant: str) -> FakeKernel:
        return FakeKernel(tenant, self.gates)

    # -- scripting -------------------------------------------------------------------------------

    def script(
        self,
        tenant: str,
        start: Literal["ok", "hang", "fail"] | int = "ok",
        *,
        ignore_shutdown: bool = False,
        ignore_term: bool = False,
    ) -> None:
        """How ``tenant``'s workers started from now on behave (see :class:`Script`);
        ``script(tenant)`` restores the default."""
        self._scripts[tenant] = Script(start, ignore_shutdown, ignore_term)

    def script_of(self, tenant: str) -> Script:
        return self._scripts.get(tenant, Script())

    def hold_spawns(self) -> None:
        """Spawns from now on wait (inside ``spawn``) until :meth:`release_spawns`."""
        self._spawns_open.clear()

    def release_spawns(self) -> None:
        self._spawns_open.set()

    # -- looking and waiting ---------------------------------------------------------------------

    def worker(self, tenant: str) -> FakeWorker | None:
        """``tenant``'s live worker (the latest, if its predecessor is still exiting)."""
        for worker in reversed(self._live.values()):
            if worker.tenant == tenant:
                return worker
        return None

    def live(self) -> list[FakeWorker]:
        """Workers not yet reported exited, oldest first."""
        return list(self._live.values())

    def starts_of(self, tenant: str) -> int:
        """How many workers have read a Start for ``tenant``."""
        return sum(1 for w in self.spawned if w.tenant == tenant)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` is true (checked after every change: a spawn, a
        Start read, a Hello sent, an exit reported); return its value.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not (value := predicate()):
                await self._changed.wait()
        return value

    async def started(self, tenant: str, timeout: float = 5.0) -> FakeWorker:
        """Wait until a live worker has read ``tenant``'s Start; return it."""
        worker: FakeWorker = await self.wait_for(lambda: self.worker(tenant), timeout)
        return worker

    def notify(self) -> None:
        """Wake :meth:`wait_for` (called by the workers)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def track(self, calls: set[asyncio.Task[None]]) -> None:
        """Calls of an exited worker, cancelled: awaited by :meth:`aclose`."""
        self._ended_calls.update(c for c in calls if not c.done())

    def forget(self, worker: FakeWorker) -> None:
        self._live.pop(worker.pid, None)

    # -- Launcher --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._start_error is not None:
            raise LaunchError(self._start_error)

    async def spawn(
        self, on_exit: ExitCallback, memory_limit: int | None, sandbox: Sandbox | None = None
    ) -> SpawnedProcess:
        """(``sandbox`` is recorded, not applied: these workers are not processes.)"""
        self.sandboxes.append(sandbox)
        if not self.closed:
            await self._spawns_open.wait()
        if self.closed:
            raise LaunchError("launcher is closed")
        if self.spawn_error is not None:
            raise LaunchError(self.spawn_error)
        fds: list[int] = []
        for _ in range(3):
            fds.extend(os.pipe())
        for fd in fds:
            os.set_blocking(fd, False)
        to_r, to_w, from_r, from_w, log_r, log_w = fds
        pid = next(self._pids)
        worker = FakeWorker(self, pid, on_exit, memory_limit, (to_r, from_w, log_w))
        self.spawned.append(worker)
        self._live[pid] = worker
        self.notify()
        return SpawnedProcess(pid, to_w, from_r, log_r)

    @property
    def memory_enforcement(self) -> str:
        return "none"

    @property
    def sandbox_report(self) -> dict[str, LayerStatus]:
        return dict(self._sandbox_report)

    @property
    def warden_pid(self) -> int | None:
        return None

    @property
    def pid_namespaces(self) -> bool:
        return False

    def memory_leaves(self) -> dict[int, str]:
        return {}

    def signal(self, pid: int, signum: int) -> None:
        worker = self._live.get(pid)
        if worker is not None:
            worker.signal(signum)

    async def aclose(self, grace: float = 5.0) -> None:
        """End every worker (SIGKILL) and wait until each exit is reported and every
        task is done. Raises RuntimeError if a worker's task failed (a bug)."""
        self.closed = True
        self._spawns_open.set()  # held spawns wake, and are refused
        workers = list(self._live.values())
        for worker in workers:
            worker.signal(signal.SIGKILL)
        for worker in workers:
            await worker.reported.wait()
        calls, self._ended_calls = self._ended_calls, set()
        await asyncio.gather(*calls, return_exceptions=True)
        if self.failures:
            raise RuntimeError(f"a fake worker failed: {self.failures[0]!r}") from self.failures[0]


if TYPE_CHECKING:
    _conforms: Launcher = FakeLauncher()
