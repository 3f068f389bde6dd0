"""The contenders ``compare.py`` runs next to corral, each behind a small interface.

Limits (the least any process-per-worker design must pay, built by hand here):

* :class:`RawPipe`: a forked child on two pipes, msgspec frames with a 4-byte length
  prefix, blocking reads and writes on both sides. One caller at a time.
* :class:`AsyncRawPipe`: the same child, driven from asyncio with ``add_reader`` and
  request ids, so that many callers can share it (what corral does, minus everything
  corral adds: supervision, timeouts, the sandbox, strict decoding).

Peers (what a user would otherwise pick):

* :class:`MpPipe`: a ``multiprocessing.Process`` serving a ``multiprocessing.Pipe``
  (pickle, ``Connection.send``/``recv``).
* :class:`Pool`: ``concurrent.futures.ProcessPoolExecutor``, loky's reusable executor
  and ``pebble.ProcessPool``, each with one worker, called with functions from
  ``_kernel``.

Starts (the floor for a cold start): :func:`fork_start` (a plain ``os.fork()``),
:func:`interpreter_start` (a fresh ``sys.executable``) and :class:`Interpreter` /
:class:`BareForkserver`, long-lived ones whose memory is measured, and
:class:`MpForkserverChild`, a child of multiprocessing's forkserver.

Every child here is reaped by whoever started it: ``close()`` ends it and waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import _kernel
import loky  # type: ignore[import-untyped]
import msgspec
import pebble

__all__ = [
    "AsyncRawPipe",
    "BareForkserver",
    "Interpreter",
    "MpForkserverChild",
    "MpPipe",
    "Pool",
    "RawPipe",
    "fork_start",
    "interpreter_start",
    "loky_pool",
    "pebble_pool",
    "process_pool_executor",
    "reap",
]

T = TypeVar("T")

HEADER = 4  # bytes of big-endian frame length, as in corral's protocol
_READ_BUFFER = 64 * 1024  # as corral reads; a pipe holds 64 KiB by default

_encoder = msgspec.msgpack.Encoder()
_pack_header = struct.Struct(">I").pack
_decoder = msgspec.msgpack.Decoder()


# --- frames -------------------------------------------------------------------------------


def frame(message: Any) -> bytes:
    """``message`` as msgpack behind a 4-byte length (the quickest way found: a
    ``bytearray`` built in place took 2.9x as long)."""
    body = _encoder.encode(message)
    return _pack_header(len(body)) + body


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(reader: IO[bytes]) -> Any:
    """The next message from a blocking stream; EOFError at its end."""
    head = reader.read(HEADER)
    if len(head) < HEADER:
        raise EOFError
    size = int.from_bytes(head, "big")
    body = reader.read(size)
    if len(body) < size:
        raise EOFError
    return _decoder.decode(body)


# --- children -----------------------------------------------------------------------------


def _serve_frames(fd_in: int, fd_out: int) -> None:
    """The raw child's loop: ``[id, method, args]`` in, ``[id, result]`` out, until EOF."""
    kernel = _kernel.Echo("raw")
    with open(fd_in, "rb", buffering=_READ_BUFFER) as reader:
        while True:
            try:
                request_id, method, args = read_frame(reader)
            except EOFError:
                return
            write_all(fd_out, frame([request_id, getattr(kernel, method)(*args)]))


def _fork(child: Callable[[], None], keep: tuple[int, ...]) -> int:
    """Fork a child that closes every fd but stdio and ``keep``, runs ``child`` and exits.

    Closing the rest matters: a child holding another child's pipe would keep that
    one from ever seeing EOF. The child never returns into the host's code."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it, not the host's handler
        low = 3
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))  # one close_range(2) call
        child()
        status = 0
    finally:
        os._exit(status)


def reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for our child ``pid`` to exit (SIGKILL it after ``timeout``), then reap it."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)


def _forked_server() -> tuple[int, int, int]:
    """A forked raw child: (pid, fd to write requests to, fd to read replies from)."""
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid = _fork(lambda: _serve_frames(request_r, reply_w), keep=(request_r, reply_w))
    os.close(request_r)
    os.close(reply_w)
    return pid, request_w, reply_r


class RawPipe:
    """The limit: blocking pipes to a forked child, one call at a time."""

    def __init__(self) -> None:
        self.pid, self._out, reply_fd = _forked_server()
        self._in = open(reply_fd, "rb", buffering=_READ_BUFFER)

    def call(self, method: str, *args: Any) -> Any:
        write_all(self._out, frame([0, method, args]))
        return read_frame(self._in)[1]

    def pipelined(self, n: int) -> None:
        """Write ``n`` put requests, then read the ``n`` replies."""
        requests = b"".join(frame([i, "put", ["k", i]]) for i in range(n))
        # Written in one go, before any reply is read: the child's replies must fit in
        # the reply pipe meanwhile (64 KiB; ~10 bytes a reply), or both would block.
        if n * 16 > 65536:
            raise ValueError(f"{n} pipelined calls could fill the reply pipe")
        write_all(self._out, requests)
        for _ in range(n):
            read_frame(self._in)

    def close(self) -> None:
        os.close(self._out)  # the child sees EOF and exits
        self._in.close()
        reap(self.pid)


class AsyncRawPipe:
    """The async limit: the same child, from asyncio (``add_reader``, request ids)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pid, self._out, self._in = _forked_server()
        os.set_blocking(self._out, False)
        os.set_blocking(self._in, False)
        self._loop = loop
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._inbox = bytearray()  # bytes read, not yet a whole frame
        self._outbox = bytearray()  # bytes the pipe had no room for yet
        loop.add_reader(self._in, self._on_readable)

    async def call(self, method: str, *args: Any) -> Any:
        request_id = next(self._ids)
        # Sent first: the child starts on it while the future is made (its reply is read
        # only once this awaits).
        self._send(frame([request_id, method, args]))
        future = self._loop.create_future()
        self._pending[request_id] = future
        return await future

    def _send(self, data: bytes) -> None:
        if self._outbox:
            self._outbox += data
            return
        try:
            written = os.write(self._out, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self._outbox += memoryview(data)[written:]
            self._loop.add_writer(self._out, self._flush)

    def _flush(self) -> None:
        try:
            written = os.write(self._out, self._outbox)
        except BlockingIOError:
            return
        del self._outbox[:written]
        if not self._outbox:
            self._loop.remove_writer(self._out)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._in, _READ_BUFFER)
        except BlockingIOError:
            return
        if not data:
            self._loop.remove_reader(self._in)
            for future in self._pending.values():
                future.set_exception(EOFError("the raw child closed its pipe"))
            self._pending.clear()
            return
        self._inbox += data
        view, pos = memoryview(self._inbox), 0
        try:
            while len(view) - pos >= HEADER:
                end = pos + HEADER + int.from_bytes(view[pos : pos + HEADER], "big")
                if end > len(view):
                    break
                request_id, result = _decoder.decode(view[pos + HEADER : end])
                pos = end
                future = self._pending.pop(request_id)
                if not future.done():  # the caller may have been cancelled
                    future.set_result(result)
        finally:
            view.release()
            del self._inbox[:pos]

    def close(self) -> None:
        self._loop.remove_reader(self._in)
        self._loop.remove_writer(self._out)
        os.close(self._out)
        os.close(self._in)
        reap(self.pid)


def _serve_connection(conn: multiprocessing.connection.Connection) -> None:
    kernel = _kernel.Echo("mp")
    while (request := conn.recv()) is not None:
        request_id, method, args = request
        conn.send((request_id, getattr(kernel, method)(*args)))


class MpPipe:
    """``multiprocessing.Pipe`` to a ``multiprocessing.Process`` (default start method)."""

    def __init__(self) -> None:
        self._conn, child_conn = multiprocessing.Pipe()
        self._process = multiprocessing.Process(
            target=_serve_connection, args=(child_conn,), name="mp-pipe-peer"
        )
        self._process.start()
        child_conn.close()
        assert self._process.pid is not None
        self.pid: int = self._process.pid

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((0, method, args))
        return self._conn.recv()[1]

    def pipelined(self, n: int) -> None:
        """``n`` put requests in flight: a thread sends while this one receives (a
        socket pair holds far fewer small messages than a pipe, so sending all first
        could block both sides)."""

        def send_all() -> None:
            for i in range(n):
                self._conn.send((i, "put", ("k", i)))

        sender = threading.Thread(target=send_all)
        sender.start()
        for _ in range(n):
            self._conn.recv()
        sender.join()

    def close(self) -> None:
        # The forked child holds its own copy of our end, so EOF would never come: ask.
        self._conn.send(None)
        self._process.join(10)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process.close()


class Pool:
    """A process pool with one worker: ``call`` blocks on ``submit().result()``;
    ``acall`` awaits the future (what ``loop.run_in_executor`` does)."""

    def __init__(
        self,
        submit: Callable[..., concurrent.futures.Future[Any]],
        close: Callable[[], None],
        start_method: str,
    ) -> None:
        self._submit = submit
        self.close = close
        self.start_method = start_method  # how the pool starts its worker
        self.pid: int = self.call(_kernel.getpid)  # also starts the worker

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = self._submit(fn, *args).result()
        return result

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await asyncio.wrap_future(self._submit(fn, *args))
        return result


def process_pool_executor() -> Pool:
    executor = concurrent.futures.ProcessPoolExecutor(max_workers=1)  # default context
    return Pool(executor.submit, executor.shutdown, multiprocessing.get_start_method())


def loky_pool() -> Pool:
    # The reusable executor stops idle workers after `timeout` seconds (default 10): a
    # long one keeps its worker warm between scenarios, as corral keeps its workers.
    executor = loky.get_reusable_executor(max_workers=1, timeout=3600)

    def close() -> None:
        executor.shutdown(wait=True, kill_workers=True)

    return Pool(executor.submit, close, "fork + exec")


def pebble_pool() -> Pool:
    pool = pebble.ProcessPool(max_workers=1)

    def submit(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return pool.schedule(fn, args)

    def close() -> None:
        pool.close()  # type: ignore[no-untyped-call]
        pool.join(10)

    return Pool(submit, close, multiprocessing.get_start_method())


# --- starts -------------------------------------------------------------------------------


def fork_start() -> tuple[float, float]:
    """A plain ``os.fork()`` whose child answers one framed message and exits.

    Returns seconds from the fork to the answer, and to the child being reaped."""
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: nothing but the answer (it may keep the host's other fds)
        status = 1
        try:
            os.close(request_w)
            os.close(reply_r)
            with open(request_r, "rb") as reader:
                request_id, _method, _args = read_frame(reader)
            write_all(reply_w, frame([request_id, os.getpid()]))
            status = 0
        finally:
            os._exit(status)
    os.close(request_r)
    os.close(reply_w)
    write_all(request_w, frame([0, "getpid", []]))
    with open(reply_r, "rb") as reader:
        read_frame(reader)
    answered = time.perf_counter() - t0
    os.close(request_w)
    os.waitpid(pid, 0)
    return answered, time.perf_counter() - t0


# A fresh interpreter: imports what corral's worker side imports from outside the
# standard library, then serves frames on stdin/stdout like the raw child (answering
# with its pid). BareForkserver forks a child from such a process and lets it serve.
_CHILD_CODE = """\
import os, sys, msgspec{imports}
dec, enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()

def serve(once):
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while len(head := inp.read(4)) == 4:
        request_id, _method, _args = dec.decode(inp.read(int.from_bytes(head, "big")))
        body = enc.encode([request_id, os.getpid()])
        out.write(len(body).to_bytes(4, "big") + body)
        out.flush()
        if once:
            return

{main}
"""
_INTERPRETER = _CHILD_CODE.format(imports=", psutil", main="serve(once={once})")
_BARE_FORKSERVER = _CHILD_CODE.format(
    imports="",
    main="""\
pid = os.fork()
if pid == 0:
    serve(once=False)
    os._exit(0)
os.waitpid(pid, 0)
""",
)


class _Child:
    """A ``sys.executable -c`` process answering frames on stdin/stdout."""

    def __init__(self, code: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def ask_pid(self) -> int:
        """One round trip; the pid of whoever answered."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(frame([0, "getpid", []]))
        self.process.stdin.flush()
        pid: int = read_frame(self.process.stdout)[1]
        return pid

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()  # EOF: it (or its forked child) returns from serve()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# multiprocessing's forkserver, from a fresh interpreter that imports nothing else (with
# ``-c`` there is no main module for the server to import): the child's target is a
# standard-library call that blocks on a pipe, so nothing of ours is imported either.
_MP_FORKSERVER = """\
import multiprocessing, multiprocessing.connection, sys
if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["msgspec"])
    theirs, mine = context.Pipe(duplex=False)  # an os.pipe: (read end, write end)
    child = context.Process(target=multiprocessing.connection.Connection.recv, args=(theirs,))
    child.start()
    print(child.pid, flush=True)
    sys.stdin.read()
    mine.send(None)
    child.join()
"""


class MpForkserverChild(_Child):
    """A child of multiprocessing's forkserver (msgspec preloaded), idle on a pipe: what
    the standard library's forkserver start gives a worker before it runs code of its own.
    ``pid`` is the child's, once it is blocked reading its pipe."""

    def __init__(self) -> None:
        super().__init__(_MP_FORKSERVER)
        try:
            assert self.process.stdout is not None
            self.pid = int(self.process.stdout.readline())
            deadline = time.monotonic() + 20
            while not _blocked_reading_a_pipe(self.pid):
                if time.monotonic() > deadline:
                    raise TimeoutError("the forkserver child did not reach its pipe read")
                time.sleep(0.005)  # polling a condition, with a deadline
        except BaseException:
            self.close()
            raise


def _blocked_reading_a_pipe(pid: int) -> bool:
    """Where the kernel shows wait channels: asleep in a pipe read. Where it does not
    (``wchan`` reads 0): asleep at all."""
    wchan = Path(f"/proc/{pid}/wchan").read_text()
    if wchan in ("", "0"):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
    return "pipe" in wchan


def interpreter_start() -> float:
    """Seconds from ``subprocess.Popen`` of a fresh interpreter (importing msgspec and
    psutil) to its answer to one message."""
    t0 = time.perf_counter()
    child = _Child(_INTERPRETER.format(once=True))
    child.ask_pid()
    elapsed = time.perf_counter() - t0
    child.close()
    return elapsed


class Interpreter(_Child):
    """A fresh interpreter (msgspec, psutil imported) that stays up until closed."""

    def __init__(self) -> None:
        super().__init__(_INTERPRETER.format(once=False))
        self.pid = self.ask_pid()


class BareForkserver(_Child):
    """A small clean Python that imported msgspec, and a child forked from it: the
    least a forkserver-started worker can weigh. ``pid`` is the forked child's."""

    def __init__(self) -> None:
        super().__init__(_BARE_FORKSERVER)
        self.pid = self.ask_pid()
        assert self.pid != self.process.pid
