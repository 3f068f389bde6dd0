"""The layers that need root: a dedicated uid per worker, and namespaces with an init.

* :class:`UidSlots` hands each live worker a uid/gid of its own from a reserved range.
  A slot is held by an ``flock`` on a per-uid lock file, so wardens of different
  supervisors on one host never hand out the same uid, and a dead warden's slots free
  themselves (the kernel drops its locks).
* :func:`fork_in_new_pid_namespace` forks a child that is pid 1 of a fresh PID
  namespace, without moving the warden: ``unshare(CLONE_NEWPID)`` only affects
  children, and ``setns`` back to the warden's own namespace right after the fork
  makes the next one fresh again.
* :func:`enter_private_mounts` (in that child) unshares mount, network, IPC and UTS
  namespaces, mounts a private ``/proc`` and a size-limited tmpfs on ``/dev/shm``.
* :func:`run_init` is that child's life as pid 1: forward termination signals to the
  worker (pid 2), reap everything, and report the worker's wait status on a pipe when
  it exits. When pid 1 exits, the kernel SIGKILLs whatever is left in the namespace:
  daemons that double-forked and called ``setsid`` included.
* :func:`enter_user_namespace`: without root, the warden itself moves into a user
  namespace of its own first, where it may create the other namespaces.
* :func:`detect` says whether each layer works here, by trying it in a throwaway child.

Not here: the unprivileged layers (``_sandbox``), cgroups (``_cgroup``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import signal
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from typing import NoReturn

from corral.ipc import LayerCheck
from corral.worker._os import check, libc, raise_errno

__all__ = [
    "UidSlots",
    "detect",
    "drop_to_uid",
    "enter_private_mounts",
    "enter_user_namespace",
    "fork_in_new_pid_namespace",
    "host_parent_pid",
    "run_init",
]

_SYS_CLONE_X86_64 = 56

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_DUMPABLE = 4

# Signals the init passes on to the worker (as pid 1 it ignores them itself otherwise).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
STATUS = struct.Struct("=i")  # the worker's raw wait status, on the status pipe


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


# -- uids ------------------------------------------------------------------------------------


class UidSlots:
    """uids ``base .. base+count-1``, one per live worker, held by flocks in ``lock_dir``."""

    def __init__(self, base: int, count: int, lock_dir: str | None = None) -> None:
        self.base = base
        self.count = count
        self.lock_dir = lock_dir or default_lock_dir()
        self._held: dict[int, int] = {}  # uid -> fd holding its lock
        self._cursor = 0

    def acquire(self) -> int:
        """A uid no other worker on this host holds. Raises OSError when all are taken."""
        _ensure_private_dir(self.lock_dir)
        for step in range(self.count):
            slot = (self._cursor + step) % self.count
            uid = self.base + slot
            if uid in self._held:
                continue
            fd = os.open(
                os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[uid] = fd
            self._cursor = slot + 1
            return uid
        raise OSError(errno.EAGAIN, f"all {self.count} worker uids from {self.base} are in use")

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the fd drops the lock


def default_lock_dir() -> str:
    base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "corral-uids")


def _ensure_private_dir(path: str) -> None:
    """Create ``path`` (0700) or accept it only if it is ours and private: in a shared
    /tmp, someone else could have made it to steer which uids we hand out."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(errno.EPERM, f"{path} is not a private directory owned by us")


def drop_to_uid(uid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, irreversibly (all of real,
    effective and saved ids). Then mark the process dumpable again: a uid change makes it
    non-dumpable, which would make its own /proc/self files root's (nobody else shares
    the uid, so this opens nothing to other processes)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


# -- namespaces ------------------------------------------------------------------------------


def fork_in_new_pid_namespace(own_pid_ns: int | None) -> int:
    """A fork whose child is pid 1 of a new PID namespace (0 in the child, its host pid
    in the parent).

    ``own_pid_ns``: an fd on the caller's own namespace (``/proc/self/ns/pid``). Then
    this is ``unshare(CLONE_NEWPID)`` + ``os.fork()`` + ``setns`` back, so the caller's
    next child is not put in the same namespace. In a user namespace, that ``setns`` is
    not allowed (our own PID namespace belongs to the host): pass None, and the child is
    made by a raw ``clone(CLONE_NEWPID)``, which never changes the caller. That child
    skips Python's after-fork hooks, which is safe for a single-threaded caller whose
    child only sets up namespaces and forks the worker with ``os.fork()``.
    """
    if own_pid_ns is None:
        if platform.machine() != "x86_64":
            raise OSError(errno.ENOSYS, f"no raw clone for {platform.machine()} yet")
        zero = ctypes.c_long(0)
        pid = int(
            libc.syscall(
                ctypes.c_long(_SYS_CLONE_X86_64),
                ctypes.c_long(CLONE_NEWPID | signal.SIGCHLD),
                zero,  # no new stack: like fork, the child continues on a copy of ours
                zero,
                zero,
                zero,
            )
        )
        if pid < 0:
            raise_errno("clone(CLONE_NEWPID)")
        return pid
    unshare(CLONE_NEWPID)
    try:
        return os.fork()
    finally:
        if os.getpid() != 1:  # the parent; the child is the new namespace's init
            check(libc.setns(own_pid_ns, CLONE_NEWPID), "setns(pid)")


def host_parent_pid() -> int:
    """The parent's pid as the host sees it (getppid() is 0 across a PID namespace).
    Read from the host's /proc, so call it before a private /proc is mounted."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"PPid:"):
                return int(line.split()[1])
    raise OSError(errno.ENOENT, "no PPid in /proc/self/status")


def enter_private_mounts(shm_bytes: int) -> None:
    """Private mount, network, IPC and UTS namespaces; a fresh /proc (this PID namespace
    only) and a tmpfs of ``shm_bytes`` on /dev/shm. The network namespace has only a
    loopback interface, down: no address is reachable."""
    unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if os.path.isdir("/dev/shm"):
        _mount(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            f"size={shm_bytes},mode=1777",
        )
    name = b"corral"
    check(libc.sethostname(name, len(name)), "sethostname")


def run_init(worker: int, status_fd: int) -> NoReturn:
    """Pid 1's loop: pass termination signals on to ``worker``, reap every process that
    ends up here, and when ``worker`` exits, write its wait status to ``status_fd`` and
    exit (the kernel then kills the rest of the namespace)."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(worker, signum)
        except OSError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            try:
                os.write(status_fd, STATUS.pack(status))
            finally:
                os._exit(0)


# -- detection -------------------------------------------------------------------------------


def _try_in_child(check: Callable[[], str | None]) -> str | None:
    """Run ``check`` in a forked child (it may change the child irreversibly); its answer
    (None: fine, else why not) comes back on a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            answer = check()
        except BaseException as exc:  # any failure is the answer
            answer = f"{type(exc).__name__}: {exc}"
        os.write(w, (answer or "").encode()[:4000])
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
    finally:
        os.waitpid(pid, 0)
    return answer or None


def _namespaces_work(user_namespace: bool) -> str | None:
    own = None if user_namespace else os.open("/proc/self/ns/pid", os.O_RDONLY)
    try:
        init = fork_in_new_pid_namespace(own)
    finally:
        if own is not None and os.getpid() != 1:
            os.close(own)
    if init == 0:
        try:
            enter_private_mounts(1 << 20)
            ok = os.listdir("/proc").count("1") == 1 and os.getpid() == 1
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(init, 0)
    return None if os.waitstatus_to_exitcode(status) == 0 else "mounting a private /proc failed"


def _uid_can_read(uid: int, paths: Sequence[str]) -> Callable[[], str | None]:
    def check() -> str | None:
        drop_to_uid(uid)
        blocked = [
            path
            for path in paths
            if not os.access(path, os.R_OK | (0 if os.path.isfile(path) else os.X_OK))
        ]
        if blocked:
            return (
                f"a worker's uid cannot read {', '.join(blocked[:3])} (the interpreter, "
                "corral or the import path lives in a private directory; use a "
                "world-readable Python and virtualenv)"
            )
        return None

    return check


def enter_user_namespace() -> None:
    """Without root: move this (single-threaded) process into a new user namespace in
    which it is root, its own uid and gid mapped to 0. It can then create PID, mount,
    network, IPC and UTS namespaces for its children; it gains nothing outside."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def detect(
    uid_base: int, must_read: Sequence[str], user_namespace: bool, namespaces: bool = True
) -> dict[str, LayerCheck]:
    """Whether ``dedicated_uid`` and (if asked for) ``namespaces`` work here, tried for
    real in throwaway children (and if not, why). ``user_namespace``: we are in the user
    namespace :func:`enter_user_namespace` made (not really root)."""
    if user_namespace:
        uid = LayerCheck(False, "needs root (a user namespace maps only our uid)")
    elif os.geteuid() != 0:
        uid = LayerCheck(False, "needs root")
    else:
        readable = [p for p in must_read if os.path.exists(p)]
        problem = _try_in_child(_uid_can_read(uid_base, readable))
        uid = LayerCheck(False, problem) if problem else LayerCheck(True, f"uids from {uid_base}")
    if not namespaces:
        ns = LayerCheck(False, "not requested")
    elif user_namespace:
        ns = _namespaces_status("pid, mount, net, ipc, uts; in a user namespace", True)
    elif os.geteuid() != 0:
        ns = LayerCheck(False, "needs root, or unprivileged user namespaces")
    else:
        ns = _namespaces_status("pid, mount, net, ipc, uts", False)
    return {"dedicated_uid": uid, "namespaces": ns}


def _namespaces_status(what: str, user_namespace: bool) -> LayerCheck:
    problem = _try_in_child(lambda: _namespaces_work(user_namespace))
    return LayerCheck(False, problem) if problem else LayerCheck(True, what)
