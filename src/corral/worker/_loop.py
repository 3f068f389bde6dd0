"""The worker's request loop: read ``Start``, build the kernel, serve ``Call``s.

Runs in the worker process on two fds: ``fd_in`` (supervisor -> worker) and
``fd_out`` (worker -> supervisor). Everything the kernel raises becomes a
``CallFailed`` with text only; nothing is pickled. Sync kernel methods run on
the worker's main thread one at a time, in arrival order; ``async def``
methods run as tasks, concurrently with each other. A kernel with no
``async def`` method is served without an event loop (see ``WorkerLoop``).

Does not cover: how the process was started or sandboxed (see ``_warden`` and
``__main__``), or deadlines (the supervisor enforces those by killing us).

Long because both ways of serving a kernel (a blocking read loop and an asyncio loop,
with the switch from one to the other at a call) share one call dispatch here.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine
from inspect import CO_COROUTINE
from typing import Any, NoReturn

import msgspec

from corral.ipc import (
    MAX_FRAME_LIMIT,
    PROTOCOL_VERSION,
    Bind,
    Call,
    CallFailed,
    ErrorKind,
    FrameDecoder,
    Hello,
    ProtocolViolation,
    RemoteError,
    Result,
    Shutdown,
    Start,
    StartFailed,
    ToWorker,
    encode_frame,
    frame_header,
)
from corral.worker._loader import load_factory
from corral.worker._os import HOST_PID_ENV, write_all

_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 64 * 1024
_READ_CHUNK = 64 * 1024
_UNKNOWN: Any = object()  # a method name not looked up yet

_args_decoder = msgspec.msgpack.Decoder(tuple[list[Any], dict[str, Any]])
_encoder = msgspec.msgpack.Encoder()
# Results that cannot be awaitable, checked by type before the slower isawaitable().
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})


# What a kernel can raise into the reply path. KeyboardInterrupt and SystemExit are not here:
# they end the worker, and the supervisor reports the exit.
_KERNEL_FAILURES = (Exception, asyncio.CancelledError)


def _clean_text(text: str) -> str:
    """Valid UTF-8 only: a lone surrogate would make the reply unencodable."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _safe_str(exc: BaseException, limit: int = _MAX_MESSAGE) -> str:
    try:
        text = str(exc)
    except BaseException:  # a hostile __str__ must not take the loop down
        text = f"<unprintable {type(exc).__name__}>"
    text = text if len(text) <= limit else text[:limit] + "...[truncated]"
    return _clean_text(text)


_MAX_TYPE_NAME = 256
_ENVELOPE = 256  # bytes for the frame header, the call id and the field headers


def remote_error(exc: BaseException, max_frame_bytes: int = MAX_FRAME_LIMIT) -> RemoteError:
    """Describe ``exc`` as bounded text that fits, encoded, in one frame of
    ``max_frame_bytes``: the type name and the message are cut first, then the traceback
    gets what room is left (its end, where the error is)."""
    # Each of the type name and the message gets at most an eighth of the frame in
    # characters (a UTF-8 character takes up to 4 bytes): together at most half.
    share = (max_frame_bytes - _ENVELOPE) // 8
    cls = type(exc)
    type_name = _clean_text(f"{cls.__module__}.{cls.__qualname__}")
    if len(type_name) > min(_MAX_TYPE_NAME, share):
        type_name = type_name[: min(_MAX_TYPE_NAME, share)] + "...[truncated]"
    message = _safe_str(exc, min(_MAX_MESSAGE, share))
    try:
        tb = _clean_text("".join(traceback.format_exception(exc)))
    except BaseException:
        tb = f"<traceback unavailable for {type_name}>"
    used = len(type_name.encode()) + len(message.encode()) + _ENVELOPE
    room = max(0, min(_MAX_TRACEBACK, max_frame_bytes - used))
    if len(tb.encode()) > room:
        marker = "...[truncated]\n"
        keep = max(0, room - len(marker))
        tail = tb.encode()[-keep:].decode("utf-8", "ignore") if keep else ""
        tb = marker + tail if room >= len(marker) else ""
    return RemoteError(type_name=type_name, message=message, traceback=tb)


def read_start(fd_in: int) -> tuple[Start, list[ToWorker], FrameDecoder[ToWorker]]:
    """Block until the ``Start`` message arrives (nothing else can come first); return it,
    what came with it in the same read, and the decoder.

    The supervisor -> worker direction is trusted and already capped by the supervisor
    at its ``max_frame_bytes``, which may exceed the default: no cap of our own here."""
    decoder: FrameDecoder[ToWorker] = FrameDecoder(ToWorker, max_frame_bytes=MAX_FRAME_LIMIT)
    first, *rest = _read_some(fd_in, decoder, "Start")
    if not isinstance(first, Start):
        raise ProtocolViolation(f"expected Start first, got {first!r}"[:300])
    return first, rest, decoder


def _read_bind(fd_in: int, decoder: FrameDecoder[ToWorker], backlog: list[ToWorker]) -> Bind:
    """A spare's ``Bind``: the next message, alone."""
    msgs = backlog or _read_some(fd_in, decoder, "Bind")
    if len(msgs) != 1 or not isinstance(msgs[0], Bind):
        raise ProtocolViolation(f"expected only Bind after a spare's Start, got {msgs!r}"[:300])
    return msgs[0]


def _read_some(fd_in: int, decoder: FrameDecoder[ToWorker], awaited: str) -> list[ToWorker]:
    """Block until at least one whole message has come."""
    while True:
        data = os.read(fd_in, _READ_CHUNK)
        if not data:
            raise EOFError(f"supervisor closed the pipe before {awaited}")
        msgs = decoder.feed(data)
        if msgs:
            return msgs


def needs_loop(kernel: Any) -> bool:
    """Whether any public function of ``kernel`` but ``shutdown`` is ``async def``.

    Read from the namespaces themselves (the instance's ``__dict__`` and each class's on
    its MRO, as ``inspect.getattr_static`` reads them), so that no code of the kernel's
    runs: no ``__dir__``, ``__getattr__`` or property. What cannot be read that way gets a
    loop. An async ``shutdown()`` hook gets a loop of its own when it runs."""
    try:
        cls = type(kernel)
        namespaces = [_TYPE_DICT(klass) for klass in _TYPE_MRO(cls)]
        try:
            instance = object.__getattribute__(kernel, "__dict__")
        except AttributeError:
            pass  # no instance dict (__slots__)
        else:
            namespaces.append(instance)
        for namespace in namespaces:  # a class's mappingproxy, or the instance's dict
            items = namespace.items() if type(namespace) is types.MappingProxyType else None
            for name, value in items if items is not None else dict.items(namespace):
                if type(name) is str and not name.startswith("_") and name != "shutdown":
                    if _is_async_function(value):
                        return True
    except Exception:
        return True
    return False


_TYPE_DICT = type.__dict__["__dict__"].__get__  # a class's own namespace, no metaclass code
_TYPE_MRO = type.__dict__["__mro__"].__get__


def _is_async_function(value: object) -> bool:
    """``async def`` (plain, or in a staticmethod or classmethod), by exact type: nothing
    of the value's own runs."""
    if type(value) is staticmethod or type(value) is classmethod:
        value = value.__func__
    return type(value) is types.FunctionType and bool(value.__code__.co_flags & CO_COROUTINE)


def _bad_frame(exc: ProtocolViolation) -> int:
    """Report a frame from the supervisor that does not decode; the worker's exit code."""
    print(f"corral worker: bad frame from supervisor: {exc}", file=sys.stderr)
    return 2


class WorkerLoop:
    """Serves one kernel over one pair of fds until Shutdown or EOF.

    Two modes. While every call returns a plain value, the loop blocks in ``read(2)`` and
    answers each call in turn: no event loop at all (the fast path, and less memory). A
    kernel with an ``async def`` method, or any call that returns an awaitable, moves the
    loop onto asyncio for good: then ``async def`` methods run as concurrent tasks and
    sync ones still run one at a time on the same thread."""

    def __init__(
        self,
        kernel: Any,
        fd_in: int,
        fd_out: int,
        decoder: FrameDecoder[ToWorker],
        max_frame_bytes: int,
    ) -> None:
        self._kernel = kernel
        self._fd_in = fd_in
        self._fd_out = fd_out
        self._decoder = decoder
        self._max_frame = max_frame_bytes
        self._methods: dict[str, Callable[..., Any] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[int] | None = None

    def serve(self) -> int:
        """Serve until Shutdown (exit code 0) or EOF on ``fd_in`` (the supervisor is gone)
        without an event loop, until a call returns an awaitable; then on asyncio. For a
        kernel that needs a loop from the start, see :meth:`serve_async`."""
        try:
            return self._serve_blocking()
        except ProtocolViolation as exc:
            return _bad_frame(exc)

    def _serve_blocking(self) -> int:
        fd_in, feed = self._fd_in, self._decoder.feed
        while True:
            data = os.read(fd_in, _READ_CHUNK)
            msgs = feed(data) if data else None  # (a bad frame raises: see serve)
            if msgs is None:
                return 0  # supervisor gone: nobody can receive results any more
            for i, msg in enumerate(msgs):
                if type(msg) is Call:
                    pending = self._dispatch(msg)
                    if pending is not None:  # from here on, an event loop serves
                        first = self._await_reply(msg.id, pending)
                        return asyncio.run(self.serve_async(msgs[i + 1 :], first))
                elif isinstance(msg, Shutdown):
                    outcome = self._shutdown_hook()
                    if outcome is not None:
                        asyncio.run(self._await_hook(outcome))
                    return 0
                else:
                    return self._unexpected(msg)

    async def serve_async(
        self, backlog: list[ToWorker] | None = None, first: Coroutine[Any, Any, None] | None = None
    ) -> int:
        """Serve on the running loop: ``first`` (a reply being awaited) and the ``backlog``
        of messages already read, then whatever arrives."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if first is not None:
            self._spawn(first)
        reading = self._handle(backlog or [])
        if reading:
            os.set_blocking(self._fd_in, False)
            loop.add_reader(self._fd_in, self._on_readable)
        try:
            return await self._done
        finally:
            if reading:
                loop.remove_reader(self._fd_in)

    def _unexpected(self, msg: ToWorker) -> int:
        print(f"corral worker: unexpected {type(msg).__name__}", file=sys.stderr)
        return 2

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd_in, _READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self._finish(0)  # supervisor gone: nobody can receive results any more
            return
        try:
            msgs = self._decoder.feed(data)
        except ProtocolViolation as exc:
            self._finish(_bad_frame(exc))
            return
        if not self._handle(msgs):
            asyncio.get_running_loop().remove_reader(self._fd_in)

    def _handle(self, msgs: list[ToWorker]) -> bool:
        """Act on ``msgs`` on the loop; False once nothing more is to be read."""
        for msg in msgs:
            if isinstance(msg, Call):
                pending = self._dispatch(msg)
                if pending is not None:
                    self._spawn(self._await_reply(msg.id, pending))
            elif isinstance(msg, Shutdown):
                self._spawn(self._shutdown())
                return False
            else:
                self._finish(self._unexpected(msg))
                return False
        return True

    def _lookup(self, name: str) -> Callable[..., Any] | None:
        """The bound public method, or None, cached by name. Raises whatever a kernel's
        attribute lookup raises (a property, ``__getattr__``); such lookups are not cached."""
        fn = None
        if not name.startswith("_"):
            candidate = getattr(self._kernel, name, None)
            if callable(candidate):
                fn = candidate
        self._methods[name] = fn
        return fn

    def _dispatch(self, call: Call) -> Awaitable[Any] | None:
        """Run ``call``; reply unless its method returned an awaitable, which is returned."""
        fn = self._methods.get(call.method, _UNKNOWN)
        if fn is _UNKNOWN:
            try:
                fn = self._lookup(call.method)
            except _KERNEL_FAILURES as exc:
                self._send_failure(call.id, "kernel", exc)
                return None
        if fn is None:
            why = "private" if call.method.startswith("_") else "not a public method of the kernel"
            err = AttributeError(f"{call.method!r} is {why}")
            self._send_failure(call.id, "method", err)
            return None
        try:
            args, kwargs = _args_decoder.decode(call.args)
        except (msgspec.DecodeError, RecursionError) as exc:
            self._send_failure(call.id, "arguments", exc)
            return None
        try:
            value = fn(*args, **kwargs)
        except _KERNEL_FAILURES as exc:
            self._send_failure(call.id, "kernel", exc)
            return None
        if type(value) not in _PLAIN and inspect.isawaitable(value):
            return value
        self._send_result(call.id, value)
        return None

    async def _await_reply(self, call_id: int, awaitable: Awaitable[Any]) -> None:
        try:
            value = await awaitable
        except _KERNEL_FAILURES as exc:
            self._send_failure(call_id, "kernel", exc)
        else:
            self._send_result(call_id, value)

    def _send_result(self, call_id: int, value: Any) -> None:
        try:
            body = _encoder.encode(Result(call_id, value))  # value and envelope: one pass
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            why = TypeError(f"the result cannot be sent: {_safe_str(exc)}")
            self._send_failure(call_id, "result", why)
            return
        if len(body) > self._max_frame:
            why = TypeError(
                f"the result cannot be sent: its frame of {len(body)} bytes exceeds the "
                f"limit of {self._max_frame} bytes"
            )
            self._send_failure(call_id, "result", why)
            return
        header = frame_header(len(body))
        n = os.writev(self._fd_out, (header, body))  # one call, nothing joined
        if n < 4:  # the pipe took part of it (a large result): the rest, not copied
            write_all(self._fd_out, header[n:], body)
        elif n < len(body) + 4:
            write_all(self._fd_out, memoryview(body)[n - 4 :])

    def _send_failure(self, call_id: int, kind: ErrorKind, exc: BaseException) -> None:
        error = remote_error(exc, self._max_frame)  # bounded, valid UTF-8: always encodable
        write_all(self._fd_out, encode_frame(CallFailed(call_id, kind, error)))

    def _shutdown_hook(self) -> Awaitable[Any] | None:
        """Call the kernel's ``shutdown()`` if it has one; what it returned if awaitable.
        Its failures are printed (the worker's stderr), not raised."""
        hook = getattr(self._kernel, "shutdown", None)
        if callable(hook):
            try:
                outcome = hook()
                if inspect.isawaitable(outcome):
                    return outcome
            except Exception:
                traceback.print_exc()
        return None

    @staticmethod
    async def _await_hook(outcome: Awaitable[Any]) -> None:
        try:
            await outcome
        except Exception:
            traceback.print_exc()

    async def _shutdown(self) -> None:
        outcome = self._shutdown_hook()
        if outcome is not None:
            await self._await_hook(outcome)
        self._finish(0)


def _start_failed(start: Start, fd_out: int, exc: BaseException) -> int:
    """Report that the factory raised ``exc``; the worker's exit code."""
    write_all(fd_out, encode_frame(StartFailed(remote_error(exc, start.max_frame_bytes))))
    return 1


def _hello(fd_out: int) -> None:
    host_pid = os.environ.pop(HOST_PID_ENV, None)  # set by the warden under namespaces
    hello = Hello(PROTOCOL_VERSION, os.getpid(), int(host_pid) if host_pid else None)
    write_all(fd_out, encode_frame(hello))


async def _serve_awaited(
    start: Start, made: Awaitable[Any], fd_in: int, fd_out: int, decoder: FrameDecoder[ToWorker]
) -> int:
    """An async factory's kernel: built and served on one loop (what the factory made may
    be bound to it)."""
    try:
        kernel = await made
    except Exception as exc:
        return _start_failed(start, fd_out, exc)
    _hello(fd_out)
    return await WorkerLoop(kernel, fd_in, fd_out, decoder, start.max_frame_bytes).serve_async()


class _WatchedPolicy(asyncio.DefaultEventLoopPolicy):
    """asyncio's default policy, noting the loop made current in this thread (the one
    ``asyncio.get_event_loop()`` makes, or one the factory sets)."""

    made: asyncio.AbstractEventLoop | None = None

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        super().set_event_loop(loop)
        self.made = loop


def _call_factory(
    start: Start, factory: Callable[[str], Any]
) -> tuple[Any, asyncio.AbstractEventLoop | None]:
    """Call the factory for ``start.tenant`` with no event loop running; return what it
    made and the loop it made current, if any (that loop serves, so that what it
    scheduled there runs).

    No loop is made for a factory that does not ask for one: a fresh loop would touch
    pages the worker shares with its warden. Raises whatever the factory raised."""
    if sys.version_info >= (3, 14):
        # get_event_loop() no longer makes a loop: only one set current is there to find.
        made = factory(start.tenant)
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_event_loop()
        except RuntimeError:
            current = None
    else:
        policy = _WatchedPolicy()
        asyncio.set_event_loop_policy(policy)
        made = factory(start.tenant)
        current = policy.made
    return made, current if current is not None and not current.is_closed() else None


def _run(loop: asyncio.AbstractEventLoop | None, main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``, on ``loop`` if given (with the same cleanup at the end)."""
    if loop is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(main)


def _factory_error(exc: Exception) -> Exception:
    """A plain factory that wanted a running loop is told how to get one."""
    if isinstance(exc, RuntimeError) and "no running event loop" in str(exc):
        hinted = RuntimeError(
            f"{exc} (corral calls a plain factory with no event loop running: make the "
            "factory `async def` to run on the loop that then serves its kernel)"
        )
        hinted.__cause__ = exc
        return hinted
    return exc


def run_worker(fd_in: int, fd_out: int) -> int:
    """Run one worker to completion; returns the process exit code.

    A plain factory is called with no event loop running; an async one (or one that
    returns an awaitable) is awaited on the loop that then serves its kernel. A loop the
    plain factory made current (``asyncio.get_event_loop()``) is the one that serves, so
    that what it scheduled there runs."""
    try:
        start, backlog, decoder = read_start(fd_in)
        if start.tenant and backlog:
            raise ProtocolViolation(f"expected only Start first, got {backlog!r}"[:300])
    except (EOFError, ProtocolViolation) as exc:
        print(f"corral worker: {exc}", file=sys.stderr)
        return 2
    try:
        factory = load_factory(start)
    except Exception as exc:
        return _start_failed(start, fd_out, exc)
    if not start.tenant:  # a spare: the factory is loaded; its tenant comes with Bind
        _hello(fd_out)  # loaded: the supervisor may bind it now
        try:
            bind = _read_bind(fd_in, decoder, backlog)
        except EOFError:
            return 0  # stopped before it was needed
        except ProtocolViolation as exc:
            print(f"corral worker: {exc}", file=sys.stderr)
            return 2
        start = msgspec.structs.replace(start, tenant=bind.tenant)
    try:
        made, loop = _call_factory(start, factory)
    except Exception as exc:
        return _start_failed(start, fd_out, _factory_error(exc))
    if inspect.isawaitable(made):
        return _run(loop, _serve_awaited(start, made, fd_in, fd_out, decoder))
    _hello(fd_out)
    worker = WorkerLoop(made, fd_in, fd_out, decoder, start.max_frame_bytes)
    if loop is not None or needs_loop(made):
        return _run(loop, worker.serve_async())
    return worker.serve()


def run_and_exit(body: Callable[[], int]) -> NoReturn:
    """Run a worker-process body and leave with its exit code, whatever it raised
    (``sys.exit`` keeps its code; anything else is printed and exits 1)."""
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        exit_process(code)


def exit_process(code: int) -> NoReturn:
    """Flush stdio and leave without running interpreter teardown (a kernel's
    atexit hooks or stuck threads must not keep a stopped worker alive)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)
