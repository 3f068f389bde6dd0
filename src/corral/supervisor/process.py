"""Starting, signalling and reaping worker processes: the launcher seam.

:class:`Launcher` is the seam between corral's policies (table, single-flight,
TTL, memory) and where a worker actually runs. :class:`WardenLauncher` is the
local implementation: one warden process per supervisor (corral's own
forkserver, started with ``subprocess`` from a clean environment) forks or
fork-execs every worker, passes it three pipes, reaps it and reports its exit
status. A remote backend would implement the same three methods.

Everything here is non-blocking on the event loop: the control socket and the
warden's pidfd are watched with ``add_reader``; sends never block (a queue
drains on writability).
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from corral.ipc import (
    PROTOCOL_VERSION,
    FromWarden,
    KillWorker,
    ProtocolViolation,
    RecordDecoder,
    SpawnFailed,
    SpawnWorker,
    ToWarden,
    WardenHello,
    WorkerExited,
    WorkerSpawned,
    encode_record,
)
from corral.ipc.launch import boot_argv

__all__ = ["ExitCallback", "LaunchError", "Launcher", "SpawnedProcess", "WardenLauncher"]

ExitCallback = Callable[[int | None], None]
"""Called once with the waitpid-style return code (None: unknown, the warden died)."""

# The directory that holds the corral package (src/ or site-packages).
_CORRAL_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LaunchError(Exception):
    """The launcher could not start a worker (the warden is unavailable or refused)."""


class SpawnedProcess(NamedTuple):
    pid: int
    to_worker: int  # write end of the request pipe (ours)
    from_worker: int  # read end of the reply pipe (ours)
    log: int  # read end of the worker's stdout+stderr pipe (ours)


class Launcher(Protocol):
    async def spawn(self, on_exit: ExitCallback) -> SpawnedProcess:
        """Start a worker. ``on_exit`` is called exactly once when it has been reaped."""
        ...

    def signal(self, pid: int, signum: int) -> None:
        """Send ``signum`` to the worker's process group (SIGKILL: its whole tree).
        Never blocks; a no-op for a worker already reaped."""
        ...

    async def aclose(self) -> None:
        """Stop the launcher; every process it started is gone when this returns."""
        ...


class _Outgoing(NamedTuple):
    data: bytes
    fds: tuple[int, ...]


class WardenLauncher:
    """Launches workers through a warden subprocess.

    Args:
        exec_workers: True for a fresh interpreter per worker ("spawn"), False for a
            fork of the warden's preloaded interpreter ("forkserver").
        env: the complete environment of the warden and every worker (set at exec).
        start_timeout: seconds the warden may take to say hello.
    """

    def __init__(self, *, exec_workers: bool, env: Mapping[str, str], start_timeout: float) -> None:
        self._exec = exec_workers
        self._env = dict(env)
        self._start_timeout = start_timeout
        self._ids = itertools.count(1)
        self._decoder: RecordDecoder[FromWarden] = RecordDecoder(FromWarden)
        self._pending: dict[int, tuple[asyncio.Future[int], ExitCallback]] = {}
        self._on_exit: dict[int, ExitCallback] = {}
        self._outbox: deque[_Outgoing] = deque()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._hello: asyncio.Future[int] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._exited: asyncio.Event | None = None
        self._closed = False
        self._up = False  # the warden said hello and has not exited since

    @property
    def warden_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    # -- warden lifecycle --------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._closed:
            raise LaunchError("launcher is closed")
        if self._up:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise LaunchError(f"could not create the warden's control socket: {exc}") from exc
        try:
            argv = boot_argv(
                sys.executable, _CORRAL_ROOT, "warden", str(theirs.fileno()), str(os.getpid())
            )
            # One short fork/exec per supervisor life (the warden); workers never block here.
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                start_new_session=True,  # a terminal's Ctrl-C is the host's to handle
                cwd="/",
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            ours.close()
            raise LaunchError(f"could not start the warden process: {exc}") from exc
        finally:
            theirs.close()
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            ours.close()
            proc.kill()
            proc.wait()  # it was just started and SIGKILLed: this returns at once
            raise LaunchError(f"could not watch the warden process: {exc}") from exc
        ours.setblocking(False)
        self._sock = ours
        self._proc = proc
        self._exited = asyncio.Event()
        self._pidfd = pidfd
        self._hello = loop.create_future()
        loop.add_reader(self._pidfd, self._on_warden_exit)
        loop.add_reader(ours, self._on_readable)
        try:
            async with asyncio.timeout(self._start_timeout):
                await asyncio.shield(self._hello)
        except TimeoutError:
            self._stop_warden(signal.SIGKILL)  # it has no workers yet
            raise LaunchError(
                f"the warden did not start within {self._start_timeout}s "
                "(is the machine overloaded?)"
            ) from None
        self._up = True

    def _stop_warden(self, signum: int) -> None:
        """Signal the warden. SIGTERM makes it kill and reap every worker before it exits;
        SIGKILL is for a warden that does not respond."""
        self._up = False
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _on_warden_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        assert self._proc is not None
        code = self._proc.wait()  # it has exited: this does not block
        self._up = False
        if self._sock is not None:
            loop.remove_reader(self._sock)
            loop.remove_writer(self._sock)
            self._sock.close()
            self._sock = None
        for item in self._outbox:
            _close_all(item.fds)
        self._outbox.clear()
        error = LaunchError(f"the warden process exited unexpectedly (return code {code})")
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(error)
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)
        # The workers die with it (parent-death SIGKILL), but children they started would
        # be orphaned to init: kill each worker's process group. (A pgid cannot be reused
        # while any member lives; the window between the group emptying and a new
        # process taking that number as its own group is the pid space wrapping around.)
        for pid in self._on_exit:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        callbacks, self._on_exit = self._on_exit, {}
        for callback in callbacks.values():
            callback(None)
        assert self._exited is not None
        self._exited.set()

    # -- control channel ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._sock is not None
        while self._sock is not None:
            try:
                record = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                record = b""
            if not record:
                # EOF: the warden is going away; its pidfd reports the exit.
                asyncio.get_running_loop().remove_reader(self._sock)
                return
            try:
                msg = self._decoder.decode(record)
            except ProtocolViolation:
                self._stop_warden(signal.SIGTERM)
                return
            self._dispatch(msg)

    def _dispatch(self, msg: FromWarden) -> None:
        if isinstance(msg, WorkerExited):
            callback = self._on_exit.pop(msg.pid, None)
            if callback is not None:
                callback(msg.returncode)
        elif isinstance(msg, WorkerSpawned):
            fut, on_exit = self._pending.pop(msg.id)
            self._on_exit[msg.pid] = on_exit
            if not fut.done():
                fut.set_result(msg.pid)
            else:  # the caller gave up: the worker gets EOF on its pipes and exits
                pass
        elif isinstance(msg, SpawnFailed):
            fut, _ = self._pending.pop(msg.id)
            if not fut.done():
                fut.set_exception(LaunchError(msg.message))
        elif isinstance(msg, WardenHello):
            assert self._hello is not None
            if msg.protocol_version != PROTOCOL_VERSION:
                self._hello.set_exception(
                    LaunchError(
                        f"warden speaks protocol {msg.protocol_version}, "
                        f"expected {PROTOCOL_VERSION} "
                        "(mixed corral installs?)"
                    )
                )
                self._stop_warden(signal.SIGTERM)
            elif not self._hello.done():
                self._hello.set_result(msg.pid)

    def _send(self, msg: ToWarden, fds: tuple[int, ...] = ()) -> None:
        """Queue a record (and fds to pass, which we close once sent); never blocks."""
        self._outbox.append(_Outgoing(encode_record(msg), fds))
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while self._outbox:
            item = self._outbox[0]
            anc = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", item.fds))]
                if item.fds
                else []
            )
            try:
                sock.sendmsg([item.data], anc)
            except BlockingIOError:
                asyncio.get_running_loop().add_writer(sock, self._flush)
                return
            except OSError:
                return  # the warden is gone; _on_warden_exit cleans up
            self._outbox.popleft()
            _close_all(item.fds)
        asyncio.get_running_loop().remove_writer(sock)

    # -- Launcher ----------------------------------------------------------------------------

    async def spawn(self, on_exit: ExitCallback) -> SpawnedProcess:
        await self._ensure_started()
        made: list[int] = []
        try:
            for _ in range(3):
                made.extend(os.pipe())
        except OSError as exc:
            _close_all(tuple(made))
            raise LaunchError(f"could not create a worker's pipes: {exc}") from exc
        to_r, to_w, from_r, from_w, log_r, log_w = made
        request_id = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (fut, on_exit)
        self._send(SpawnWorker(request_id, self._exec), (to_r, from_w, log_w))
        try:
            pid = await fut
        except BaseException:
            _close_all((to_w, from_r, log_r))  # a worker that did start sees EOF and exits
            raise
        for fd in (to_w, from_r, log_r):
            os.set_blocking(fd, False)
        return SpawnedProcess(pid, to_w, from_r, log_r)

    def signal(self, pid: int, signum: int) -> None:
        if pid in self._on_exit:
            self._send(KillWorker(pid, signum))

    async def aclose(self) -> None:
        self._closed = True
        if self._starting is not None:
            try:
                await asyncio.shield(self._starting)
            except LaunchError:
                pass
        if self._sock is None or self._exited is None:
            return
        # EOF on its control socket makes the warden kill and reap everything, then exit.
        self._sock.shutdown(socket.SHUT_RDWR)
        try:
            async with asyncio.timeout(5.0):
                await self._exited.wait()
        except TimeoutError:
            self._stop_warden(signal.SIGKILL)
            await self._exited.wait()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
