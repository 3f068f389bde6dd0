"""The warden: corral's own forkserver, the parent and reaper of every worker.

The supervisor starts one warden per ``Supervisor`` with ``subprocess`` (clean
environment allowlist at exec, only its control socket open, its own session).
The warden never loads tenant code. On ``SpawnWorker`` it receives three pipe
fds and either forks (``exec=False``: the child inherits the warden's preloaded
modules and starts in a few ms) or forks and execs a fresh interpreter
(``exec=True``). It reports each worker's pid and, after ``waitpid``, its exit
status; it signals only workers it has not reaped yet, so a reused pid is never
signalled.

Teardown guarantees (invariant 5): the warden is a child subreaper, so orphaned
grandchildren come back to it; after a worker exits, its process group and any
orphans are SIGKILLed and reaped. When the supervisor dies (control socket EOF,
or the parent-death signal), the warden SIGKILLs every descendant, reaps them
and exits. Workers also carry a parent-death SIGKILL tied to the warden.

It keeps one record (``_children``) per child it has not reaped yet: a worker or a
scratch remover; a child without one is an orphan.

Does not cover: the request protocol (``_loop``), sandboxing (``_sandbox``,
``_privileged``), cgroups (``_cgroup``) or scratch directories (``_scratch``).

Long because the warden is one event loop over its control socket, its children's
exits and signals, and each step of a spawn (fork, sandbox, pipes) must be in it.
"""

from __future__ import annotations

import array
import fcntl
import os
import selectors
import signal
import socket
import sys
import tempfile
from typing import NoReturn

import psutil

from corral.ipc import (
    PROTOCOL_VERSION,
    KillWorker,
    LayerCheck,
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
from corral.worker import _loop, _privileged, _sandbox, _scratch
from corral.worker._cgroup import Cgroups, Leaves, detect
from corral.worker._children import Child, ScratchRemover, Worker
from corral.worker._os import (
    HOST_PID_ENV,
    limit_data_segment,
    set_child_subreaper,
    set_parent_death_signal,
)

WORKER_FD_IN = 3
WORKER_FD_OUT = 4
_RECORD_MAX = 64 * 1024
_FDS_PER_SPAWN = 3


class Warden:
    def __init__(
        self,
        control: socket.socket,
        python: str,
        corral_root: str,
        cgroups: Cgroups,
        root_layers: dict[str, LayerCheck],
        user_namespace: bool,
    ) -> None:
        self._ctl = control
        self._pid = os.getpid()
        self._root_layers = root_layers
        namespaces = root_layers.get("namespaces")
        self._namespaces = namespaces is not None and namespaces.available
        # An fd on our own PID namespace, to come back to after creating a worker's (not
        # allowed from a user namespace: there a worker's init is cloned straight into it).
        self._own_pid_ns = (
            os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            if self._namespaces and not user_namespace
            else None
        )
        self._uid_slots: _privileged.UidSlots | None = None
        # Every child not reaped yet, e.g.
        # {4242: Worker(4242, 200017, 9, Scratch(...), Leaves(...)), 4250: ScratchRemover(...)}.
        self._children: dict[int, Child] = {}
        # The memory and pids hierarchies (v2 or v1); a worker's leaves are in its record.
        self._cgroups = cgroups
        self._python = python
        self._corral_root = corral_root
        self._decoder: RecordDecoder[ToWarden] = RecordDecoder(ToWarden)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()

    # -- main loop ---------------------------------------------------------------------------

    def serve(self) -> NoReturn:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        # Handlers only need to exist: the wakeup fd does the work.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._sel.register(self._ctl, selectors.EVENT_READ, "ctl")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._send(
            WardenHello(
                PROTOCOL_VERSION,
                os.getpid(),
                self._cgroups.memory is not None,
                self._cgroups.memory_detail,
                {
                    **_sandbox.detect(),
                    "scratch_quota": _scratch.detect_quota(),
                    "cgroup_tree": LayerCheck(
                        self._cgroups.pids is not None, self._cgroups.pids_detail
                    ),
                    **self._root_layers,
                },
            )
        )
        while True:
            for key, _ in self._sel.select():
                if key.data == "ctl":
                    self._on_control()
                else:
                    self._on_wakeup()

    def _on_wakeup(self) -> None:
        try:
            signals = os.read(self._wake_r, 4096)
        except BlockingIOError:
            signals = b""
        if signal.SIGTERM in signals:
            self._teardown("SIGTERM (supervisor gone?)")
        self._reap()

    def _on_control(self) -> None:
        fds: list[int] = []
        try:
            data, ancdata, _flags, _addr = self._ctl.recvmsg(
                _RECORD_MAX, socket.CMSG_SPACE(_FDS_PER_SPAWN * 4)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            self._teardown("supervisor closed the control socket")
        try:
            msg = self._decoder.decode(data)
        except ProtocolViolation as exc:
            self._teardown(f"bad control record: {exc}")
        if isinstance(msg, SpawnWorker):
            self._spawn(msg, fds)
        else:
            for fd in fds:
                os.close(fd)
            self._kill(msg)

    def _send(self, msg: WardenHello | WorkerSpawned | SpawnFailed | WorkerExited) -> None:
        try:
            self._ctl.sendall(encode_record(msg))
        except OSError:
            self._teardown("supervisor closed the control socket")

    # -- spawning ----------------------------------------------------------------------------

    def _spawn(self, msg: SpawnWorker, fds: list[int]) -> None:
        if len(fds) != _FDS_PER_SPAWN:
            for fd in fds:
                os.close(fd)
            self._send(SpawnFailed(msg.id, f"expected 3 fds, got {len(fds)}"))
            return
        spec = msg.sandbox
        scratch: _scratch.Scratch | None = None
        uid = None
        leaves = Leaves((), None)
        status_r = status_w = -1
        try:
            # A memory leaf for every worker where memory cgroups work (what it and all it
            # starts use is counted there, wherever they go); its hard limit if it has one.
            # A pids leaf (or the same leaf, on v2) for a bounded, killable tree.
            leaves = self._cgroups.make(
                memory_limit=msg.memory_limit if msg.memory_method == "cgroup" else None,
                max_processes=spec.max_processes if spec.cgroup_tree else None,
            )
            if spec.uid_range is not None:
                if self._uid_slots is None:
                    self._uid_slots = _privileged.UidSlots(*spec.uid_range)
                uid = self._uid_slots.acquire()
            if spec.scratch:
                scratch = _scratch.make(uid, spec.scratch_bytes, spec.scratch_inodes)
            if spec.namespaces:
                if not self._namespaces:
                    raise OSError("namespaces are not available here")
                status_r, status_w = os.pipe2(os.O_CLOEXEC)
                pid = _privileged.fork_in_new_pid_namespace(self._own_pid_ns)
            else:
                pid = os.fork()
        except OSError as exc:
            for fd in (*fds, status_r, status_w):
                if fd >= 0:
                    os.close(fd)
            if scratch is not None:
                self._release_scratch(scratch)
            self._cgroups.discard(leaves)
            if uid is not None and self._uid_slots is not None:
                self._uid_slots.release(uid)
            self._send(SpawnFailed(msg.id, f"could not start a worker: {exc}"))
            return
        if pid == 0:
            _loop.run_and_exit(lambda: self._child(fds, msg, leaves, scratch, uid, status_w))
        for fd in fds:
            os.close(fd)
        init_status = None
        if status_w >= 0:
            os.close(status_w)
            init_status = status_r
        self._children[pid] = Worker(pid, uid, init_status, scratch, leaves)
        self._send(WorkerSpawned(msg.id, pid, leaves.memory))

    def _child(
        self,
        fds: list[int],
        msg: SpawnWorker,
        leaves: Leaves,
        scratch: _scratch.Scratch | None,
        uid: int | None,
        status_w: int,
    ) -> int:
        """The new worker's steps, in order (see ARCHITECTURE.md, "Order of steps in a
        new worker"). With namespaces this process is pid 1 of a new PID namespace: it
        sets up the namespaces, forks the worker (pid 2) and stays as its init."""
        # First of all, before any other code runs: the cgroups (so everything is counted
        # and killable), or the memory rlimit.
        Cgroups.join(leaves)
        if msg.memory_limit is not None and msg.memory_method != "cgroup":
            limit_data_segment(msg.memory_limit)
        exec_fresh = msg.exec
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        parent_pid = self._pid
        if msg.sandbox.namespaces:
            # Namespaces next, while single-threaded; the host's /proc is still mounted.
            set_parent_death_signal(signal.SIGKILL, self._pid, parent=_privileged.host_parent_pid)
            # The host's /proc, kept open across the private one: the worker reads its own
            # host pid there ("self" resolves in the reader's namespace) for stats().
            host_proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            _privileged.enter_private_mounts(msg.sandbox.shm_bytes)
            worker = os.fork()
            if worker != 0:
                for fd in fds:
                    os.close(fd)
                os.closerange(3, status_w)  # keep nothing of the warden's but the pipe
                os.closerange(status_w + 1, _max_fd())
                _privileged.run_init(worker, status_w)
            os.close(status_w)
            os.environ[HOST_PID_ENV] = os.readlink("self", dir_fd=host_proc)
            os.close(host_proc)
            parent_pid = 1
        fd_in, fd_out, fd_log = fds
        null = os.open(os.devnull, os.O_RDONLY)
        # Park the fds above the target range first so dup2 cannot clobber one of them.
        parked = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in (null, fd_log, fd_in, fd_out)
        ]
        targets = (0, 1, 2, WORKER_FD_IN, WORKER_FD_OUT)
        sources = (parked[0], parked[1], parked[1], parked[2], parked[3])
        for target, src in zip(targets, sources, strict=True):
            os.dup2(src, target, inheritable=exec_fresh)
        os.closerange(WORKER_FD_OUT + 1, _max_fd())
        # Then: rlimits, scratch dir, uid, parent-death signal, no-new-privs, Landlock,
        # seccomp.
        _sandbox.apply(msg.sandbox, scratch.path if scratch is not None else None, uid, parent_pid)
        tempfile.tempdir = None  # the warden's cached /tmp: let tempfile follow TMPDIR
        if exec_fresh:
            argv = boot_argv(
                self._python, self._corral_root, "worker", str(WORKER_FD_IN), str(WORKER_FD_OUT)
            )
            os.execve(self._python, argv, dict(os.environ))
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        return _loop.run_worker(WORKER_FD_IN, WORKER_FD_OUT)

    # -- signals and reaping -----------------------------------------------------------------

    def _kill(self, msg: KillWorker) -> None:
        worker = self._children.get(msg.pid)
        if not isinstance(worker, Worker):
            return  # already reaped: its pid may belong to someone else now
        victims: list[psutil.Process] = []
        if msg.signal == signal.SIGKILL:
            try:
                victims = psutil.Process(msg.pid).children(recursive=True)
            except psutil.Error:
                victims = []
            if worker.init_status is not None:
                # A namespace's init: kill everything below it and let it report how its
                # worker ended (killed, or exited a moment ago: a crash must not read as
                # our SIGKILL). It exits at once, and the kernel kills any straggler.
                for proc in victims:
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        pass
                return
        for kill, target in ((os.killpg, msg.pid), (os.kill, msg.pid)):
            try:
                kill(target, msg.signal)
            except OSError:  # gone (or, without root, not ours to signal)
                pass
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)  # psutil checks the create time: no reused pid
            except psutil.Error:
                pass

    def _reap(self) -> None:
        orphans_died = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self._children.pop(pid, None)
            if isinstance(child, Worker):
                self._worker_reaped(child, status)
            elif child is None:  # not ours to report: an orphan
                orphans_died = True
        if orphans_died:
            # Orphans we adopted have died. Their own children (say, a daemon that
            # double-forked) were reparented to us as they died: sweep again, once for
            # the whole batch (a fork bomb's hundreds of orphans must not cost a scan
            # each: the warden starts nothing meanwhile).
            self._kill_orphans()
            self._cgroups.sweep()

    def _worker_reaped(self, worker: Worker, status: int) -> None:
        """Finish off what the worker left, release what was set up for it and report its
        exit. Its record is gone already."""
        status = self._worker_status(worker, status)
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # whatever the worker left in its group
        except OSError:  # gone (or, without root, not ours to signal)
            pass
        self._kill_orphans()
        # Everything left in its cgroups dies: its whole tree, setsid'd and reparented
        # descendants too (its memory leaf alone is enough for that).
        oom = self._cgroups.reaped(worker.leaves)
        if worker.scratch is not None:
            self._release_scratch(worker.scratch)
        if worker.uid is not None and self._uid_slots is not None:
            self._uid_slots.release(worker.uid)  # its whole tree is gone: free to reuse
        self._send(WorkerExited(worker.pid, os.waitstatus_to_exitcode(status), oom))

    def _release_scratch(self, scratch: _scratch.Scratch) -> None:
        remover = _scratch.release(scratch)
        if remover is not None:
            self._children[remover] = ScratchRemover(remover, scratch)

    @staticmethod
    def _worker_status(worker: Worker, status: int) -> int:
        """The worker's own wait status: for a namespace init, what it reported on its
        status pipe (if it lived to report; else it was killed, and its status is it)."""
        status_r = worker.init_status
        if status_r is None:
            return status
        try:
            report = os.read(status_r, _privileged.STATUS.size)
        except OSError:
            report = b""
        finally:
            os.close(status_r)
        if len(report) == _privileged.STATUS.size:
            (status,) = _privileged.STATUS.unpack(report)
        return status

    def _kill_orphans(self) -> None:
        """Children that are not workers were reparented to us: a worker's escaped
        descendants (double fork). Nobody can tell whose they are; they go. (A child of
        ours keeps its pid until we reap it, so signalling it by pid is safe.)"""
        for pid in self._child_pids():
            if pid not in self._children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _child_pids(self) -> list[int]:
        """Our direct children: the kernel's list for our (only) thread, which costs a
        read of our own, not a scan of every process on the host; psutil where the
        kernel has no such list."""
        try:
            with open(f"/proc/self/task/{self._pid}/children", "rb") as listing:
                return [int(pid) for pid in listing.read().split()]
        except OSError:
            try:
                return [child.pid for child in psutil.Process().children()]
            except psutil.Error:
                return []

    def _teardown(self, why: str) -> NoReturn:
        """Kill every descendant, reap them all, exit. Repeats until no child is left, so a
        process forked after one round's snapshot is caught by the next."""
        workers = [child for child in self._children.values() if isinstance(child, Worker)]
        while True:
            self._cgroups.kill_all(worker.leaves for worker in workers)
            for worker in workers:
                try:
                    os.killpg(worker.pid, signal.SIGKILL)
                except OSError:  # gone (or, without root, not ours to signal)
                    pass
            try:
                everyone = psutil.Process().children(recursive=True)
            except psutil.Error:
                everyone = []
            for proc in everyone:
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            try:
                os.waitpid(-1, 0)  # one of the SIGKILLed children (they die promptly)
            except ChildProcessError:
                break  # no children left at all
            except InterruptedError:
                pass
        self._cgroups.remove_all(worker.leaves for worker in workers)
        for child in self._children.values():  # none of them runs any more
            if child.scratch is not None:
                _scratch.remove_now(child.scratch)
        os._exit(0)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


def main(
    control_fd: int,
    host_pid: int,
    python: str,
    corral_root: str,
    *,
    want_cgroups: bool,
    root_probe_uid: int | None,
    want_namespaces: bool,
    must_read: list[str],
) -> NoReturn:
    """Entry point: ``python -m corral.worker warden CONTROL_FD HOST_PID [options]``.
    ``root_probe_uid``: check the root-only layers (a worker as that uid must be able to
    read the interpreter, corral, and ``must_read``: the host's import path)."""
    set_parent_death_signal(signal.SIGTERM, host_pid)
    set_child_subreaper()
    # Memory (unless memory_method="rlimit") and pids cgroups, v2 or v1 per controller.
    cgroups = detect(os.getpid(), memory=want_cgroups)
    root_layers: dict[str, LayerCheck] = {}
    user_namespace = False
    if root_probe_uid is not None:
        if os.geteuid() != 0 and want_namespaces:
            try:
                _privileged.enter_user_namespace()  # still single-threaded: it must be
                user_namespace = True
            except OSError:
                pass  # detect() says why the layers are unavailable
        root_layers = _privileged.detect(
            root_probe_uid,
            [os.path.realpath(python), corral_root, *sys.path, *must_read],
            user_namespace,
            want_namespaces,
        )
    _scratch.remove_stale()
    # Preload what every forked worker needs so that a spawn costs a fork, not imports.
    import asyncio  # noqa: F401

    _sandbox.prepare()
    import gc

    gc.freeze()  # keep preloaded objects out of the collector: fewer copy-on-write faults
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)
    Warden(
        control,
        python,
        corral_root,
        cgroups,
        root_layers,
        user_namespace,
    ).serve()
