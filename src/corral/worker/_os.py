"""Small Linux process helpers for the child side (libc through ctypes)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def raise_errno(what: str) -> NoReturn:
    """Raise OSError for the libc call ``what`` that just failed (errno from ctypes)."""
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def check(result: int, what: str) -> None:
    """A libc call's result: 0 is success, anything else raises (see raise_errno)."""
    if result != 0:
        raise_errno(what)


def _prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def set_parent_death_signal(
    signum: int, expected_ppid: int, parent: Callable[[], int] = os.getppid
) -> None:
    """Ask the kernel to send ``signum`` when our parent dies, and close the race in
    which the parent died before the request (then exit at once). ``parent`` reads the
    parent's pid (across a PID namespace, ``getppid()`` says 0)."""
    _prctl(PR_SET_PDEATHSIG, signum)
    if parent() != expected_ppid:
        os._exit(70)


def set_child_subreaper() -> None:
    """Orphaned descendants are reparented to us instead of pid 1, so we can reap them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


M_ARENA_MAX = -8


THREAD_STACK_BYTES = 1024 * 1024
THREAD_STACK_ENV = "CORRAL_THREAD_STACK_SIZE"
HOST_PID_ENV = "CORRAL_HOST_PID"  # a worker in a PID namespace: its pid on the host


def limit_data_segment(limit: int) -> None:
    """A hard memory limit without cgroups: ``RLIMIT_DATA`` (heap and private mappings;
    a kernel sees ``MemoryError``). It counts every thread's stack *reservation* (8 MiB
    each by default, touched or not) and glibc's per-thread malloc arenas (64 MiB each),
    which would leave room for only a few dozen threads. So threads started from Python
    get 1 MiB stacks (plenty for Python code) and glibc at most 2 arenas."""
    import resource
    import threading

    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    threading.stack_size(THREAD_STACK_BYTES)  # this (forked) interpreter
    os.environ[THREAD_STACK_ENV] = str(THREAD_STACK_BYTES)  # an exec'd one: see __main__
    os.environ["MALLOC_ARENA_MAX"] = "2"  # for an exec'd interpreter
    libc.mallopt(M_ARENA_MAX, 2)  # for this (forked) one


def write_all(fd: int, *parts: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``parts``, in order, to a blocking fd (a pipe write may be
    partial); the parts are not joined first."""
    if len(parts) == 1:
        n = os.write(fd, parts[0])
        if n == len(parts[0]):  # the usual case: one write
            return
    else:
        n = os.writev(fd, parts)
        if n == sum(map(len, parts)):
            return
    views = [memoryview(part) for part in parts]
    while views:
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0
        if views:
            n = os.writev(fd, views[:64])
