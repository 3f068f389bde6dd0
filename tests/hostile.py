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


def make(tenant: str) -> HostileKernel:
    return HostileKernel(tenant)


def hang_on_import(tenant: str) -> HostileKernel:
    """The factory never returns for tenants named ``hang*`` (as if importing the kernel
    hung); every other tenant gets a kernel."""
    if tenant.startswith("hang"):
        time.sleep(3600)  # ok-sleep: a factory that never returns
    return HostileKernel(tenant)
