"""Hostile kernels for ``tests/supervisor/test_hostile.py``, loaded in real workers by
import string (``"tests.hostile:make"``, ``"tests.hostile:hang_on_import"``).

They build on :class:`tests.kernels.Kernel` (whose probes, such as ``connect_tcp``,
``send_signal``, ``start_child``, ``garbage``, ``bomb``, ``identity`` or ``fill_shm``,
they keep) and add attacks of their own. Every attack is bounded here, in the kernel
code, so that a sandbox layer that is missing cannot hurt the machine: bombs stop at
``BOMB_CAP`` processes or threads that only wait and end by themselves after
``BOMB_LIFE`` seconds, files stop at a cap, signals are 0 or ones the target handles
(the test picks them).
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import threading
import time
from typing import Any

import msgspec

from corral.ipc import Result, encode_frame
from tests.kernels import Kernel

BOMB_CAP = 150  # processes or threads a bomb starts at most
BOMB_LIFE = 30.0  # seconds each of them lives at most, even if nothing kills it
SHM = "/dev/shm"
_MIB = 1 << 20


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _linger() -> None:
    """The life of a forked bomb process: wait, then leave without running any of the
    worker's code again (whatever happens, it never returns)."""
    try:
        time.sleep(BOMB_LIFE)  # ok-sleep: a bomb process only has to exist, for a bounded time
    finally:
        os._exit(0)


class _Canary:
    """Unpickling this creates the file at ``path`` (``open(path, "x")``): proof that
    someone unpickled what a worker sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "x"))


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ refuses")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ refuses")


class HostileKernel(Kernel):
    """A kernel whose methods attack the worker, the supervisor and the host."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        self._hoard: list[int] = []
        self._stubborn = False

    # -- runaway calls ------------------------------------------------------------------------

    def sleep_forever(self) -> None:
        time.sleep(3600)  # ok-sleep: the attack is a call that never returns

    def stop_self(self) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)

    # -- bombs (bounded) ---------------------------------------------------------------------

    def fork_bomb(self, cap: int = BOMB_CAP) -> dict[str, Any]:
        """Fork up to ``cap`` processes that only wait; stop at the first fork that fails.
        Returns their pids (as this worker sees them) and the errno name that stopped it."""
        cap = min(cap, BOMB_CAP)
        pids: list[int] = []
        error = None
        while len(pids) < cap:
            try:
                pid = os.fork()
            except OSError as exc:
                error = _errno_name(exc)
                break
            if pid == 0:
                _linger()
            pids.append(pid)
        return {"pids": pids, "error": error}

    def thread_bomb(self, cap: int = BOMB_CAP) -> dict[str, Any]:
        """Start up to ``cap`` threads that only wait (and are left running); stop at the
        first that cannot start."""
        cap = min(cap, BOMB_CAP)
        never = threading.Event()
        started = 0
        error = None
        while started < cap:
            thread = threading.Thread(target=never.wait, args=(BOMB_LIFE,), daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread" (EAGAIN)
                error = str(exc)
                break
            started += 1
        return {"started": started, "error": error}

    def hoard_fds(self, cap: int = 4096) -> dict[str, Any]:
        """Open /dev/null until it fails (or ``cap``), and keep every fd open."""
        error = None
        while len(self._hoard) < cap:
            try:
                self._hoard.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                error = _errno_name(exc)
                break
        return {"open": len(self._hoard), "error": error}

    # -- secrets -----------------------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        """The environment as Python sees it (``env()`` reads /proc/self/environ)."""
        return dict(os.environ)

    def read_environ(self, pid: int) -> str:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode(errors="replace")

    # -- the IPC pipe ------------------------------------------------------------------------

    def send_big_frame(self, size: int) -> None:
        """Write a well-formed Result frame carrying ``size`` bytes straight to the reply
        pipe, past the worker loop's own size check."""
        value = msgspec.Raw(msgspec.msgpack.encode(b"x" * size))
        frame = memoryview(encode_frame(Result(1, value)))
        while frame:
            frame = frame[os.write(4, frame) :]

    def send_pickle(self, path: str, framed: bool) -> None:
        """Write a pickle that would create ``path`` if anyone unpickled it, to the reply
        pipe: as a whole frame (length prefix + pickle) or as raw bytes."""
        body = pickle.dumps(_Canary(path))
        os.write(4, len(body).to_bytes(4, "big") + body if framed else body)

    # -- signals and termination --------------------------------------------------------------

    def become_stubborn(self) -> bool:
        """Ignore SIGTERM, and make ``shutdown()`` hang."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._stubborn = True
        return True

    def shutdown(self) -> None:
        if self._stubborn:
            time.sleep(3600)  # ok-sleep: a shutdown hook that never returns
        super().shutdown()

    def segfault(self) -> None:
        import ctypes

        ctypes.string_at(0)

    # -- exceptions that fight back ----------------------------------------------------------

    def raise_unprintable(self) -> None:
        raise _Unprintable

    def raise_enormous(self, size: int) -> None:
        raise ValueError("x" * size)

    def raise_enormous_type(self, size: int) -> None:
        """An exception class whose name alone is ``size`` characters."""
        raise type("E" * size, (Exception,), {})("boom")

    # -- /dev/shm ----------------------------------------------------------------------------

    def shm_list(self) -> list[str]:
        return sorted(os.listdir(SHM))

    def shm_write(self, prefix: str, count: int = 4, size: int = _MIB) -> list[str]:
        """Leave ``count`` files of ``size`` bytes in /dev/shm; return what it lists."""
        for i in range(count):
            with open(os.path.join(SHM, f"{prefix}-{i}"), "wb") as f:
                f.write(b"s" * size)
        return self.shm_list()

    # -- privileges ------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, int]:
        """This process's capability sets (CapEff, CapPrm, CapInh, CapBnd, CapAmb)."""
        sets = {}
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Cap"):
                    name, _, value = line.partition(":")
                    sets[name] = int(value, 16)
        return sets

    def privileged_acts(self) -> dict[str, str]:
        """Acts that need a capability, each harmless if it works (the host name set to
        what it is): "ok" or the errno name that refused it."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        out = {}
        name = os.uname().nodename.encode()
        out["sethostname"] = "ok" if libc.sethostname(name, len(name)) == 0 else _errno_of(ctypes)
        # CAP_SYS_RESOURCE: raise our own hard limit past what it is
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
            out["raise_rlimit"] = "ok"
        except (OSError, ValueError) as exc:
            out["raise_rlimit"] = _errno_name(exc) if isinstance(exc, OSError) else "EPERM"
        return out

    def plant_setuid(self) -> dict[str, Any]:
        """Try to leave a setuid/setgid executable in the scratch dir, and to make a file
        immutable: each attempt's "ok" or errno name, with the scratch dir's path."""
        import fcntl
        import shutil
        import stat
        import struct
        import sys

        here = os.getcwd()
        target = os.path.join(here, "plant")
        shutil.copyfile(os.path.realpath(sys.executable), target)  # an executable of ours
        out: dict[str, Any] = {"scratch": here}

        _attempt(out, "chmod_setuid", lambda: os.chmod(target, 0o4755))
        _attempt(out, "chmod_setgid", lambda: os.chmod(target, 0o2755))
        _attempt(out, "fchmod_setuid", lambda: _fchmod(target, 0o4755))
        _attempt(
            out,
            "create_setuid",
            lambda: os.close(os.open(os.path.join(here, "made"), os.O_CREAT | os.O_WRONLY, 0o4755)),
        )
        _attempt(out, "mkdir_setgid", lambda: os.mkdir(os.path.join(here, "dir"), 0o2755))
        fs_ioc_setflags, immutable = 0x40086602, 0x10

        def set_immutable() -> None:
            fd = os.open(target, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, fs_ioc_setflags, struct.pack("l", immutable))
            finally:
                os.close(fd)

        _attempt(out, "immutable", set_immutable)
        mode = os.stat(target).st_mode
        out["mode_bits"] = stat.S_IMODE(mode)
        made = os.path.join(here, "made")
        out["made_bits"] = stat.S_IMODE(os.stat(made).st_mode) if os.path.exists(made) else None
        return out

    def litter(self, count: int) -> str:
        """Leave ``count`` files in the scratch dir; return its path."""
        here = os.getcwd()
        for i in range(count):
            with open(os.path.join(here, f"litter-{i}"), "wb") as f:
                f.write(b"x")
        return here

    # -- other processes -----------------------------------------------------------------------

    def act_on(self, pid: int) -> dict[str, str]:
        """Act on process ``pid`` in ways that change nothing if they work (each sets what
        is already set, or sends signal 0): "ok" or the errno name that refused it."""
        import ctypes
        import resource

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        out: dict[str, str] = {}

        def prlimit() -> None:
            current = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, current)

        def nice() -> None:
            os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, pid))

        def affinity() -> None:
            os.sched_setaffinity(pid, os.sched_getaffinity(pid))

        def scheduler() -> None:
            os.sched_setscheduler(pid, os.sched_getscheduler(pid), os.sched_getparam(pid))

        def ioprio() -> None:  # ioprio_get / ioprio_set(IOPRIO_WHO_PROCESS, pid, same)
            prio = libc.syscall(252, 1, pid)
            if prio < 0 or libc.syscall(251, 1, pid, prio) != 0:
                raise OSError(ctypes.get_errno(), "ioprio")

        def madvise() -> None:  # process_madvise(pidfd -1, ...): the call itself is refused
            if libc.syscall(440, -1, None, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "process_madvise")

        def pidfd() -> None:
            os.close(os.pidfd_open(pid))

        _attempt(out, "prlimit", prlimit)
        _attempt(out, "setpriority", nice)
        _attempt(out, "sched_setaffinity", affinity)
        _attempt(out, "sched_setscheduler", scheduler)
        _attempt(out, "ioprio_set", ioprio)
        _attempt(out, "kill", lambda: os.kill(pid, 0))
        _attempt(out, "process_madvise", madvise)
        _attempt(out, "pidfd_open", pidfd)
        for what in ("environ", "maps", "cmdline"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    f.read(1)
                out[what] = "ok"
            except OSError as exc:
                out[what] = _errno_name(exc)
        return out

    # -- sockets -------------------------------------------------------------------------------

    def socket_families(self) -> dict[str, str]:
        """Create (and close) a socket of each family: "ok" or the errno name; and an
        AF_UNIX socketpair."""
        import socket

        families = {
            "AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17,
            "AF_ALG": 38, "AF_VSOCK": 40, "AF_XDP": 44,
        }  # fmt: skip
        out = {}
        for name, family in families.items():
            kind = socket.SOCK_RAW if family == 44 else socket.SOCK_STREAM
            if family in (16, 17):
                kind = socket.SOCK_RAW if family == 17 else socket.SOCK_DGRAM
            if family == 38:
                kind = socket.SOCK_SEQPACKET
            try:
                socket.socket(family, kind, 0).close()
                out[name] = "ok"
            except OSError as exc:
                out[name] = _errno_name(exc)
        try:
            for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM):
                end.close()
            out["socketpair"] = "ok"
        except OSError as exc:
            out["socketpair"] = _errno_name(exc)
        return out

    # -- the scratch disk ----------------------------------------------------------------------

    def fill_scratch(self, cap_bytes: int, cap_files: int) -> dict[str, Any]:
        """Write one file until the disk refuses (or ``cap_bytes``), then create empty
        files until it refuses (or ``cap_files``); leave them all."""
        here = os.getcwd()
        written, error = 0, None
        chunk = b"d" * _MIB
        with open(os.path.join(here, "big"), "wb", buffering=0) as f:
            while written < cap_bytes:
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    error = _errno_name(exc)
                    break
        files, files_error = 0, None
        while files < cap_files:
            try:
                os.close(os.open(os.path.join(here, f"f{files}"), os.O_CREAT | os.O_WRONLY))
            except OSError as exc:
                files_error = _errno_name(exc)
                break
            files += 1
        return {"bytes": written, "error": error, "files": files, "files_error": files_error}


def _attempt(out: dict[str, Any], name: str, act: Any) -> None:
    """Run ``act``; note under ``name`` whether it worked ("ok") or the errno that stopped it."""
    try:
        act()
        out[name] = "ok"
    except OSError as exc:
        out[name] = _errno_name(exc)


def _errno_of(ctypes: Any) -> str:
    return errno.errorcode.get(ctypes.get_errno(), "?")


def _fchmod(path: str, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make(tenant: str) -> HostileKernel:
    return HostileKernel(tenant)


def hang_on_import(tenant: str) -> HostileKernel:
    """The factory never returns for tenants named ``hang*`` (as if importing the kernel
    hung); every other tenant gets a kernel."""
    if tenant.startswith("hang"):
        time.sleep(3600)  # ok-sleep: a factory that never returns
    return HostileKernel(tenant)
