"""Kernels that try to dodge a worker's memory accounting or exhaust its process table:
children that leave the worker's tree (double fork + ``setsid``) and hold memory, a fork
bomb and a thread bomb. Used by ``tests/supervisor/test_accounting.py``."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

# Run by each escapee (a fresh interpreter, so its memory is its own and the token in its
# command line lets the test find it on the host, whatever PID namespace it is in):
# allocate, touch every page, report on the inherited fd, then wait to be killed.
_ESCAPEE = """
import os, signal, sys
mib, fd = int(sys.argv[1]), int(sys.argv[2])
block = bytearray(mib << 20)
block[::4096] = b"\\x01" * len(block[::4096])
os.write(fd, b"1")
os.close(fd)
while True:
    signal.pause()
"""


class Kernel:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def whoami(self) -> int:
        return os.getpid()

    def escape(self, count: int, mib: int, token: str) -> int:
        """Start ``count`` processes that leave this worker's tree (fork, ``setsid``, fork
        again, the middle one exits: they are reparented) and each hold ``mib`` MiB of
        touched memory. Returns once every one has allocated."""
        ready_r, ready_w = os.pipe()
        for _ in range(count):
            middle = os.fork()
            if middle == 0:
                try:
                    os.setsid()
                    if os.fork() == 0:
                        os.set_inheritable(ready_w, True)
                        argv = [sys.executable, "-c", _ESCAPEE, str(mib), str(ready_w), token]
                        os.execv(sys.executable, argv)
                finally:
                    os._exit(0)
            os.waitpid(middle, 0)
        os.close(ready_w)
        got = 0
        while got < count:
            chunk = os.read(ready_r, count)
            if not chunk:
                break  # an escapee died before allocating (the caller sees the count)
            got += len(chunk)
        os.close(ready_r)
        return got

    def fork_bomb(self, n: int) -> dict[str, Any]:
        """Try to fork ``n`` children that wait on a pipe; report how many started and
        the error that stopped it, then release and reap them."""
        release_r, release_w = os.pipe()
        children: list[int] = []
        error = None
        for _ in range(n):
            try:
                pid = os.fork()
            except OSError as exc:
                error = f"{type(exc).__name__}: errno {exc.errno}"
                break
            if pid == 0:
                os.close(release_w)
                os.read(release_r, 1)  # EOF once the parent closes its end
                os._exit(0)
            children.append(pid)
        os.close(release_w)
        os.close(release_r)
        for pid in children:
            os.waitpid(pid, 0)
        return {"started": len(children), "error": error}

    def thread_bomb(self, n: int) -> dict[str, Any]:
        """Try to start ``n`` threads that wait on an event; as ``fork_bomb``."""
        release = threading.Event()
        threads: list[threading.Thread] = []
        error = None
        for _ in range(n):
            thread = threading.Thread(target=release.wait)
            try:
                thread.start()
            except RuntimeError as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            threads.append(thread)
        release.set()
        for thread in threads:
            thread.join()
        return {"started": len(threads), "error": error}


def make(tenant: str) -> Kernel:
    return Kernel(tenant)
