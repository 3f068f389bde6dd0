"""Scratch directories: each worker's private cwd, HOME and TMPDIR (warden side).

A scratch directory is made in the warden before the fork and removed once its worker
is reaped. As root (``scratch_bytes`` set), it is a tmpfs of its own, mounted
``nosuid,nodev`` with a size and an inode limit: a kernel that fills it gets ENOSPC and
goes on, a setuid file in it is never honoured, its pages count against the worker's
memory cgroup (tmpfs pages are charged to whoever writes them), and removing it is one
lazy unmount, however many files the kernel left. Without root it is a plain directory
in the host's temporary directory, removed by a short-lived child process so that the
warden, which starts every worker, is never held by a tree of 100,000 files.

Directories are named ``corral-scratch-<warden pid>-*``; a new warden removes those of
wardens that no longer exist.

This module keeps no state: :func:`make` returns a :class:`Scratch` record, and
:func:`release` returns the pid of the child removing it, if any.

Not here: which worker or remover child holds which directory, and reaping the removers
(the warden's per-child records: ``_children``, ``_warden``); the worker's side
(``_sandbox`` makes the directory its cwd and the only writable place under Landlock).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile

import msgspec

from corral.ipc import LayerCheck
from corral.worker._os import check, libc

__all__ = [
    "PREFIX",
    "Scratch",
    "detect_quota",
    "make",
    "release",
    "remove_now",
    "remove_stale",
    "remove_tree",
]

PREFIX = "corral-scratch-"
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2


def _mount_tmpfs(path: str, size: int, inodes: int, uid: int | None) -> None:
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    data = f"size={size},nr_inodes={inodes},mode=0700{owner}"
    check(
        libc.mount(
            b"corral-scratch",
            path.encode(),
            b"tmpfs",
            ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
            data.encode(),
        ),
        f"mount tmpfs on {path}",
    )


def _unmount(path: str) -> None:
    """Detach the tmpfs on ``path`` (lazily: it is freed once nothing uses it)."""
    if libc.umount2(path.encode(), _MNT_DETACH) != 0 and ctypes.get_errno() not in (
        errno.EINVAL,  # not a mount point (any more)
        errno.ENOENT,
    ):
        check(-1, f"umount {path}")


def detect_quota() -> LayerCheck:
    """Whether a size-limited tmpfs can be mounted for a scratch dir here, or why not
    (for ``stats().sandbox``)."""
    if os.geteuid() != 0:
        return LayerCheck(False, "needs root (a size- and inode-limited tmpfs per worker)")
    try:
        probe = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-probe-")
    except OSError as exc:
        return LayerCheck(False, f"cannot create a directory in {tempfile.gettempdir()}: {exc}")
    try:
        _mount_tmpfs(probe, 1 << 20, 64, None)
        _unmount(probe)
    except OSError as exc:
        return LayerCheck(False, str(exc.strerror or exc))
    finally:
        os.rmdir(probe)
    return LayerCheck(True, "tmpfs, nosuid,nodev")


class Scratch(msgspec.Struct, frozen=True):
    """One scratch directory, from :func:`make` to :func:`release` (or :func:`remove_now`).
    Which worker uses it is the warden's record of that worker, not kept here."""

    path: str  # e.g. "/tmp/corral-scratch-4242-k3j9x_2a"
    mounted: bool  # a tmpfs of its own (goes with one unmount), else a plain directory


def make(uid: int | None, size: int | None, inodes: int | None) -> Scratch:
    """A new scratch directory, owned by ``uid`` (if any); a tmpfs when ``size`` is set.

    Raises:
        OSError: it could not be made or mounted (nothing is left behind).
    """
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    try:
        if size is not None:
            _mount_tmpfs(path, size, inodes or 16_384, uid)
            return Scratch(path, mounted=True)
        if uid is not None:
            os.chown(path, uid, uid)
    except OSError:
        os.rmdir(path)
        raise
    return Scratch(path, mounted=False)


def release(scratch: Scratch) -> int | None:
    """Remove a scratch directory that no process uses any more, without blocking on its
    contents: a tmpfs is detached; a plain directory is removed by a child process
    (inline only if no child can be forked).

    Returns:
        The pid of that child, which the caller reaps (and must not take for an orphan
        meanwhile); None if the directory is gone already.
    """
    if scratch.mounted:
        try:
            _unmount(scratch.path)
            os.rmdir(scratch.path)
            return None
        except OSError:
            pass  # still there: remove what is in it like a plain directory
    try:
        pid = os.fork()
    except OSError:
        remove_tree(scratch.path)
        return None
    if pid == 0:
        try:
            remove_tree(scratch.path)
        finally:
            os._exit(0)
    return pid


def remove_now(scratch: Scratch) -> None:
    """Remove a scratch directory inline: at the warden's exit, once every child (a
    remover of this very directory, too) is gone."""
    if scratch.mounted:
        try:
            _unmount(scratch.path)
        except OSError:
            pass
    remove_tree(scratch.path)


def remove_tree(path: str) -> None:
    """Remove a scratch directory. A tenant controls what is in it: a tree deeper than
    rmtree's recursion can go must neither crash the warden (and with it every worker)
    nor stay behind, so what rmtree leaves is removed without recursion."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except Exception:  # RecursionError, MemoryError: the loop below takes over
        pass
    if os.path.lexists(path):
        _remove_deep(path)


def _remove_deep(path: str) -> None:
    """Depth-first removal with directory fds and an explicit stack (no recursion, no
    long paths). Gives up quietly where it cannot go on (e.g. out of fds)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    stack: list[tuple[int, str]] = []  # (parent dir fd, name of the dir we are in)
    try:
        while True:
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    try:
                        os.unlink(entry.name, dir_fd=fd)
                    except OSError:
                        pass
            if sub is not None:
                child = os.open(sub, flags, dir_fd=fd)
                stack.append((fd, sub))
                fd = child
                continue
            os.close(fd)
            fd = -1
            if not stack:
                os.rmdir(path)
                return
            fd, name = stack.pop()
            os.rmdir(name, dir_fd=fd)
    except OSError:
        pass
    finally:
        for parent, _name in stack:
            os.close(parent)
        if fd >= 0:
            os.close(fd)


def remove_stale() -> None:
    """Remove scratch directories left by wardens that were killed (and so could not
    clean up): ``corral-scratch-<warden pid>-*`` whose warden is gone (a tmpfs is
    unmounted first)."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            path = os.path.join(root, name)
            if os.path.ismount(path):
                try:
                    _unmount(path)
                except OSError:
                    continue
            remove_tree(path)
