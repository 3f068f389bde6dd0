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

Long because the seam and its one backend live together: the warden's control protocol,
its start and replacement, and what its death means for every worker it had (process
groups, pidfds, cgroup leaves).
"""

from __future__ import annotations

import array
import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple, Protocol

import msgspec

from corral.ipc import (
    PROTOCOL_VERSION,
    FromWarden,
    KillWorker,
    LayerCheck,
    ProtocolViolation,
    RecordDecoder,
    SandboxSpec,
    SpawnFailed,
    SpawnWorker,
    ToWarden,
    WardenHello,
    WorkerExited,
    WorkerSpawned,
    encode_record,
)
from corral.ipc.launch import boot_argv
from corral.supervisor.records import LayerStatus
from corral.supervisor.sandbox import Sandbox, SandboxUnavailableError

__all__ = ["ExitCallback", "LaunchError", "Launcher", "SpawnedProcess", "WardenLauncher"]

log = logging.getLogger("corral")

ExitCallback = Callable[[int | None, bool], None]
"""Called once with the waitpid-style return code (None: unknown, the warden died) and
whether the OS's memory limit (the OOM killer in the worker's cgroup) ended it."""

# The directory that holds the corral package (src/ or site-packages).
_SPECS_KEPT = 64  # tenants' own sandboxes resolved and kept per warden
_CORRAL_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LaunchError(Exception):
    """The launcher could not start a worker (the warden is unavailable or refused)."""


class SpawnedProcess(NamedTuple):
    pid: int
    to_worker: int  # write end of the request pipe (ours)
    from_worker: int  # read end of the reply pipe (ours)
    log: int  # read end of the worker's stdout+stderr pipe (ours)


class Launcher(Protocol):
    async def start(self) -> None:
        """Get ready to spawn (start the warden, check what the host supports).
        Raises LaunchError if it cannot."""
        ...

    async def spawn(
        self, on_exit: ExitCallback, memory_limit: int | None, sandbox: Sandbox | None = None
    ) -> SpawnedProcess:
        """Start a worker. ``on_exit`` is called exactly once when it has been reaped.
        ``memory_limit`` (bytes) is a hard limit the OS enforces. ``sandbox``: this
        worker's, if not the launcher's own (LaunchError if the host cannot give it)."""
        ...

    @property
    def memory_enforcement(self) -> str:
        """How ``memory_limit`` is enforced, in words (known once a worker was started)."""
        ...

    @property
    def sandbox_report(self) -> dict[str, LayerStatus]:
        """Sandbox layer -> what is in force (known once :meth:`start` returned)."""
        ...

    @property
    def warden_pid(self) -> int | None:
        """The pid of the process workers are forked from, while it runs (a fresh worker
        weighs what it does); None where there is none."""
        ...

    @property
    def pid_namespaces(self) -> bool:
        """True if a worker's pid is an init of its own pid namespace whose child runs
        the kernel: its memory is what is below it, not counting itself."""
        ...

    def memory_leaves(self) -> dict[int, str]:
        """Worker pid -> the directory of its memory cgroup leaf, for the workers that
        have one (their memory is read there). A snapshot; may be called from a thread."""
        ...

    def signal(self, pid: int, signum: int) -> None:
        """Send ``signum`` to the worker's process group (SIGKILL: its whole tree).
        Never blocks; a no-op for a worker already reaped. May report the exit (call
        ``on_exit``) before it returns."""
        ...

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop the launcher; every process it started is gone when this returns.
        ``grace``: seconds for an orderly stop before processes are killed outright."""
        ...


class _Outgoing(NamedTuple):
    data: bytes
    fds: tuple[int, ...]


class _WardenLink:
    """One warden process and everything tied to its life: the control socket, the pidfd
    that reports its exit, the send queue, spawns in progress and the exit callbacks of
    its workers. A restarted warden is a new object, so late events of an old one can
    never touch the new one's state."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, pidfd: int) -> None:
        self.proc = proc
        self.sock: socket.socket | None = sock
        self.pidfd = pidfd
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[int] = loop.create_future()
        self.hello.add_done_callback(_consume_exception)
        self.exited = asyncio.Event()
        self.pending: dict[int, tuple[asyncio.Future[int], ExitCallback]] = {}
        self.on_exit: dict[int, ExitCallback] = {}
        self.pidfds: dict[int, int] = {}  # worker pid -> a pidfd on it, until it is reaped
        # worker pid -> its memory cgroup leaf, until it is reaped, e.g.
        # "/sys/fs/cgroup/memory/corral-1234/w7" (the warden's report; the warden is ours)
        self.memory_leaves: dict[int, str] = {}
        self._outbox: deque[_Outgoing] = deque()
        self._decoder: RecordDecoder[FromWarden] = RecordDecoder(FromWarden)
        self.memory_cgroups = False
        self.memory_cgroups_detail = "unknown until the warden starts"
        self.sandbox_layers: dict[str, LayerCheck] = {}
        self.specs: dict[bytes, SandboxSpec] = {}  # tenants' own sandboxes, resolved here
        loop.add_reader(pidfd, self._on_process_exit)
        loop.add_reader(sock, self._on_readable)

    @property
    def is_up(self) -> bool:
        return self.hello.done() and not self.hello.exception() and not self.exited.is_set()

    def stop(self, signum: int) -> None:
        """SIGTERM makes the warden kill and reap every worker before it exits; SIGKILL is
        for a warden that does not respond."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def close_control(self) -> None:
        """EOF on its control socket: the warden kills and reaps everything, then exits."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- exit ---------------------------------------------------------------------------------

    def _on_process_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        code = self.proc.wait()  # the pidfd said it has exited: this does not block
        if self.sock is not None:
            loop.remove_reader(self.sock)
            loop.remove_writer(self.sock)
            self.sock.close()
            self.sock = None
        for item in self._outbox:
            _close_all(item.fds)
        self._outbox.clear()
        error = LaunchError(f"the warden process exited unexpectedly (return code {code})")
        if not self.hello.done():
            self.hello.set_exception(error)
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)
        # The workers die with it (parent-death SIGKILL), but children they started would
        # be orphaned to init: kill each worker's process group. (A pgid cannot be reused
        # while any member lives; the window between the group emptying and a new
        # process taking that number as its own group is the pid space wrapping around.)
        # Children that left the group with setsid escape this; a cgroup would not.
        for pid in self.on_exit:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # A worker stopped (or slow) between its fork and its parent-death signal has no
        # group of its own yet and nothing to take it down: its pidfd reaches it, and
        # only it (a pidfd never refers to a reused pid).
        pidfds, self.pidfds = self.pidfds, {}
        for pidfd in pidfds.values():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:  # gone already
                pass
            os.close(pidfd)
        # Descendants that left their worker's session escape killpg, not its cgroup.
        _kill_cgroup_members(self.memory_leaves.values())
        self.memory_leaves.clear()
        callbacks, self.on_exit = self.on_exit, {}
        for callback in callbacks.values():
            callback(None, False)
        self.exited.set()

    # -- control channel ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        while self.sock is not None:
            try:
                record = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                record = b""
            if not record:
                # EOF: the warden is going away; its pidfd reports the exit.
                asyncio.get_running_loop().remove_reader(self.sock)
                return
            try:
                msg = self._decoder.decode(record)
            except ProtocolViolation:
                self.stop(signal.SIGTERM)
                return
            self._dispatch(msg)

    def _dispatch(self, msg: FromWarden) -> None:
        if isinstance(msg, WorkerExited):
            pidfd = self.pidfds.pop(msg.pid, None)
            if pidfd is not None:
                os.close(pidfd)
            self.memory_leaves.pop(msg.pid, None)
            callback = self.on_exit.pop(msg.pid, None)
            if callback is not None:
                callback(msg.returncode, msg.oom_killed)
        elif isinstance(msg, WorkerSpawned):
            fut, on_exit = self.pending.pop(msg.id)
            self.on_exit[msg.pid] = on_exit
            if msg.memory_cgroup is not None:
                self.memory_leaves[msg.pid] = msg.memory_cgroup
            try:  # not reaped before the warden has reported it: still this worker
                self.pidfds[msg.pid] = os.pidfd_open(msg.pid)
            except OSError:  # out of fds, or gone already: killpg below still applies
                pass
            if not fut.done():
                fut.set_result(msg.pid)
            # else: the caller gave up; the worker sees EOF on its pipes and exits.
        elif isinstance(msg, SpawnFailed):
            fut, _ = self.pending.pop(msg.id)
            if not fut.done():
                fut.set_exception(LaunchError(msg.message))
        elif isinstance(msg, WardenHello) and not self.hello.done():
            if msg.protocol_version != PROTOCOL_VERSION:
                self.hello.set_exception(
                    LaunchError(
                        f"warden speaks protocol {msg.protocol_version}, "
                        f"expected {PROTOCOL_VERSION} (mixed corral installs?)"
                    )
                )
                self.stop(signal.SIGTERM)
            else:
                self.memory_cgroups = msg.memory_cgroups
                self.memory_cgroups_detail = msg.memory_cgroups_detail
                self.sandbox_layers = dict(msg.sandbox_layers)
                self.hello.set_result(msg.pid)

    def send(self, msg: ToWarden, fds: tuple[int, ...] = ()) -> None:
        """Queue a record (and fds to pass, which are closed once sent); never blocks."""
        self._outbox.append(_Outgoing(encode_record(msg), fds))
        self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        while self._outbox:
            item = self._outbox[0]
            anc = []
            if item.fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", item.fds))]
            try:
                sock.sendmsg([item.data], anc)
            except BlockingIOError:
                loop.add_writer(sock, self._flush)
                return
            except OSError:
                # Gone, or unusable: either way stop it; its exit fails whatever waits.
                loop.remove_writer(sock)
                self.stop(signal.SIGTERM)
                return
            self._outbox.popleft()
            _close_all(item.fds)
        loop.remove_writer(sock)


class WardenLauncher:
    """Launches workers through a warden subprocess (one at a time; restarted on demand).

    Args:
        exec_workers: True for a fresh interpreter per worker ("spawn"), False for a
            fork of the warden's preloaded interpreter ("forkserver").
        env: the complete environment of the warden and every worker (set at exec).
        start_timeout: seconds the warden may take to say hello.
        memory_method: how hard memory limits are enforced: ``"cgroup"`` (required),
            ``"rlimit"`` (no memory cgroups: RLIMIT_DATA, and tree RSS for accounting) or
            ``"auto"`` (cgroups where the host allows,
            else rlimit).
    """

    def __init__(
        self,
        *,
        exec_workers: bool,
        env: Mapping[str, str],
        start_timeout: float,
        memory_method: Literal["auto", "cgroup", "rlimit"] = "auto",
        sandbox: Sandbox | None = None,
    ) -> None:
        self._exec = exec_workers
        self._sandbox = sandbox if sandbox is not None else Sandbox.none()
        self._sandbox_spec: SandboxSpec | None = None
        self._sandbox_report: dict[str, LayerStatus] = {}
        self._memory_method = memory_method
        self._env = dict(env)
        self._start_timeout = start_timeout
        self._ids = itertools.count(1)
        self._warden: _WardenLink | None = None
        self._starting: asyncio.Task[_WardenLink] | None = None
        self._closed = False

    @property
    def warden_pid(self) -> int | None:
        warden = self._warden
        return warden.proc.pid if warden is not None and warden.is_up else None

    @property
    def memory_enforcement(self) -> str:
        warden = self._warden
        if self._memory_method == "rlimit":
            return "rlimit (RLIMIT_DATA): memory_method='rlimit'"
        if warden is None or not warden.hello.done():
            return "unknown until the warden starts"
        if warden.memory_cgroups:
            return warden.memory_cgroups_detail
        return f"rlimit (RLIMIT_DATA): {warden.memory_cgroups_detail}"

    @property
    def sandbox_report(self) -> dict[str, LayerStatus]:
        return dict(self._sandbox_report)

    @property
    def pid_namespaces(self) -> bool:
        namespaces = self._sandbox_report.get("namespaces")
        return namespaces is not None and namespaces.on

    def memory_leaves(self) -> dict[int, str]:
        """Worker pid -> the directory of its memory cgroup leaf, for the workers that
        have one: their memory is read there (it counts all they started, wherever it
        went). A snapshot, for the memory probe's thread."""
        warden = self._warden
        return dict(warden.memory_leaves) if warden is not None else {}

    async def start(self) -> None:
        """Start the warden now rather than with the first worker.

        Raises:
            LaunchError: it could not start, or ``memory_method="cgroup"`` and the host
                has no usable memory cgroup.
        """
        warden = await self._ready_warden()
        if self._memory_method == "cgroup" and not warden.memory_cgroups:
            raise LaunchError(
                "memory_method='cgroup' but no memory cgroup can be used: "
                + warden.memory_cgroups_detail
            )

    async def _ready_warden(self) -> _WardenLink:
        if self._closed:
            raise LaunchError("launcher is closed")
        warden = self._warden
        if warden is not None and warden.is_up:
            return warden
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._replace(warden))
        starting = self._starting
        try:
            return await asyncio.shield(starting)
        finally:
            if self._starting is starting and starting.done():
                self._starting = None

    async def _replace(self, old: _WardenLink | None) -> _WardenLink:
        """Start a new warden once the old one (if any) has fully exited."""
        if old is not None:
            await _end_warden(old, grace=5.0)
        warden = self._warden = self._launch()
        try:
            async with asyncio.timeout(self._start_timeout):
                await asyncio.shield(warden.hello)
        except TimeoutError:
            warden.stop(signal.SIGKILL)  # it has no workers yet
            raise LaunchError(
                f"the warden did not start within {self._start_timeout}s "
                "(is the machine overloaded?)"
            ) from None
        try:
            self._sandbox_spec, self._sandbox_report = self._sandbox.resolve(warden.sandbox_layers)
        except SandboxUnavailableError as exc:
            warden.stop(signal.SIGTERM)
            raise LaunchError(str(exc)) from exc
        for layer, status in self._sandbox_report.items():
            if status.state == "unavailable":
                log.warning(
                    "sandbox layer=%s %s (best effort: running without it)",
                    layer,
                    status,
                    extra={"layer": layer},
                )
        return warden

    def _launch(self) -> _WardenLink:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise LaunchError(f"could not create the warden's control socket: {exc}") from exc
        try:
            argv = boot_argv(
                sys.executable, _CORRAL_ROOT, "warden", str(theirs.fileno()), str(os.getpid())
            )
            if self._memory_method != "rlimit":
                argv.append("cgroups")
            if self._sandbox.needs_root_probe:
                # A worker's own uid must be able to read what it will import.
                argv.append(f"root={self._sandbox.uid_range[0]}")
                if self._sandbox.namespaces:
                    argv.append("namespaces")
                readable = (*(p for p in sys.path if p), *self._sandbox.extra_read_paths)
                argv.extend(f"read={path}" for path in readable)
            # One short fork/exec per warden (normally once per supervisor); workers never
            # block the loop.
            proc = subprocess.Popen(
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
            proc.wait()  # just started and SIGKILLed: returns at once
            raise LaunchError(f"could not watch the warden process: {exc}") from exc
        ours.setblocking(False)
        return _WardenLink(proc, ours, pidfd)

    # -- Launcher ----------------------------------------------------------------------------

    async def spawn(
        self, on_exit: ExitCallback, memory_limit: int | None, sandbox: Sandbox | None = None
    ) -> SpawnedProcess:
        warden = await self._ready_warden()
        spec = self._spec(warden, sandbox)
        method: Literal["cgroup", "rlimit"] = "rlimit"
        if memory_limit is not None and self._memory_method != "rlimit":
            if warden.memory_cgroups:
                method = "cgroup"
            elif self._memory_method == "cgroup":
                raise LaunchError(
                    "memory_method='cgroup' but no memory cgroup can be used: "
                    + warden.memory_cgroups_detail
                )
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
        warden.pending[request_id] = (fut, on_exit)
        spawn = SpawnWorker(request_id, self._exec, memory_limit, method, spec)
        warden.send(spawn, (to_r, from_w, log_w))
        try:
            pid = await fut
        except BaseException:
            _close_all((to_w, from_r, log_r))  # a worker that did start sees EOF and exits
            raise
        for fd in (to_w, from_r, log_r):
            os.set_blocking(fd, False)
        return SpawnedProcess(pid, to_w, from_r, log_r)

    def _spec(self, warden: _WardenLink, sandbox: Sandbox | None) -> SandboxSpec:
        """What a worker applies: the launcher's own sandbox's spec, or ``sandbox``
        resolved against what this warden found (made once per sandbox and warden)."""
        if sandbox is None:
            assert self._sandbox_spec is not None  # resolved when the warden said hello
            return self._sandbox_spec
        key = msgspec.msgpack.encode(sandbox)
        spec = warden.specs.get(key)
        if spec is None:
            try:
                spec, _ = sandbox.resolve(warden.sandbox_layers)
            except SandboxUnavailableError as exc:
                raise LaunchError(f"this tenant's sandbox: {exc}") from None
            if len(warden.specs) >= _SPECS_KEPT:
                warden.specs.pop(next(iter(warden.specs)))
            warden.specs[key] = spec
        return spec

    def signal(self, pid: int, signum: int) -> None:
        warden = self._warden
        if warden is not None and pid in warden.on_exit:
            warden.send(KillWorker(pid, signum))

    async def aclose(self, grace: float = 5.0) -> None:
        self._closed = True
        if self._starting is not None:
            try:
                await asyncio.shield(self._starting)
            except LaunchError:
                pass
        warden = self._warden
        if warden is None:
            return
        warden.close_control()
        await _end_warden(warden, grace)


def _kill_cgroup_members(leaves: Iterable[str]) -> None:
    """SIGKILL every process in these cgroup leaves (a dead warden's live workers' leaves:
    what their workers left behind). cgroup v2: one write to ``cgroup.kill``. v1: each
    member through a pidfd, signalled only if that very process is still in the leaf (a
    pid read from ``cgroup.procs`` may have been reused by then). A few writes to cgroupfs,
    made once per warden death, on the loop (they do not wait on anything)."""
    for leaf in leaves:
        try:
            fd = os.open(os.path.join(leaf, "cgroup.kill"), os.O_WRONLY)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.write(fd, b"1")
                continue
            except OSError:
                pass
            finally:
                os.close(fd)
        try:
            with open(os.path.join(leaf, "cgroup.procs"), "rb") as procs:
                members = [int(pid) for pid in procs.read().split()]
        except (OSError, ValueError):
            continue
        relative = "/" + os.path.basename(os.path.dirname(leaf)) + "/" + os.path.basename(leaf)
        for pid in members:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone
            try:
                with open(f"/proc/{pid}/cgroup", "rb") as where:
                    # The line's path ends with the leaf ("/corral-1/w7", not ".../w70").
                    if any(line.endswith(relative.encode()) for line in where.read().split()):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)


async def _end_warden(warden: _WardenLink, grace: float) -> None:
    """Wait up to ``grace`` seconds for a warden asked to stop (SIGTERM, or its control
    socket closed), then SIGKILL it: a stopped or wedged warden must not hold anyone."""
    warden.stop(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await warden.exited.wait()
    except TimeoutError:
        warden.stop(signal.SIGKILL)
        await warden.exited.wait()


def _consume_exception(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
