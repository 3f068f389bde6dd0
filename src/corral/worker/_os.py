"""Small Linux process helpers for the child side (prctl via ctypes)."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(signum: int, expected_ppid: int) -> None:
    """Ask the kernel to send ``signum`` when our parent dies, and close the race in
    which the parent died before the request (then exit at once)."""
    _prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != expected_ppid:
        os._exit(70)


def set_child_subreaper() -> None:
    """Orphaned descendants are reparented to us instead of pid 1, so we can reap them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


M_ARENA_MAX = -8


def limit_data_segment(limit: int) -> None:
    """A hard memory limit without cgroups: ``RLIMIT_DATA`` (heap and private mappings,
    thread stacks included; a kernel sees ``MemoryError``). Unlike ``RLIMIT_AS`` it does
    not count reserved-but-untouched address space, so threads keep working; fewer
    glibc malloc arenas (each reserves 64 MiB per thread) keep that true for threaded
    kernels."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    os.environ["MALLOC_ARENA_MAX"] = "2"  # for an exec'd interpreter
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mallopt(M_ARENA_MAX, 2)  # for this (forked) one


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte to a blocking fd (a pipe write may be partial)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
