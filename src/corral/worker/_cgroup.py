"""Per-worker memory cgroups, managed by the warden (child side).

A memory cgroup is the only limit the kernel enforces on a whole process tree
and that a kernel cannot catch: past it, the OOM killer SIGKILLs the worker.
The warden makes one directory of its own under its current memory cgroup
(``corral-<warden pid>``) and one leaf per worker inside it; the forked child
moves itself into its leaf before any kernel code runs. After the worker is
reaped, the warden reads the leaf's OOM-kill count (so the supervisor can say
"memory" rather than "killed from outside") and removes it.

Supported: cgroup v1 with the ``memory`` controller (as on hosts with a hybrid
hierarchy). cgroup v2 delegation is not attempted yet; where no usable memory
cgroup exists (not root, no controller, read-only mount) :func:`detect` says why
and the supervisor falls back to ``RLIMIT_DATA``.
"""

from __future__ import annotations

import os

__all__ = ["MemoryCgroups", "detect"]

_V1_ROOT = "/sys/fs/cgroup/memory"


def _own_v1_path() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _num, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return path
    except OSError:
        return None
    return None


class MemoryCgroups:
    """The warden's own cgroup directory and its per-worker leaves (v1 memory)."""

    def __init__(self, base: str) -> None:
        self.base = base  # e.g. /sys/fs/cgroup/memory/<own>/corral-1234
        self._leaves: dict[int, str] = {}  # worker pid -> leaf path
        self._stale: list[str] = []  # leaves to remove once their last process is gone
        self._next = 0

    def new_leaf(self, limit: int) -> str:
        """Create a leaf with a hard limit (memory and memory+swap) and return its path."""
        self._next += 1
        leaf = os.path.join(self.base, f"w{self._next}")
        os.mkdir(leaf)
        try:
            _write(os.path.join(leaf, "memory.limit_in_bytes"), str(limit))
            swap = os.path.join(leaf, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):  # only with swap accounting; else swap is not limited
                _write(swap, str(limit))
        except OSError:
            os.rmdir(leaf)
            raise
        return leaf

    def adopt(self, pid: int, leaf: str) -> None:
        self._leaves[pid] = leaf

    @staticmethod
    def join(leaf: str) -> None:
        """Move the calling process (the forked child) into ``leaf``."""
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))

    def release(self, pid: int) -> bool:
        """The worker was reaped: return whether the OOM killer acted in its leaf, and
        remove the leaf (now, or later once the last process in it is gone)."""
        leaf = self._leaves.pop(pid, None)
        if leaf is None:
            return False
        oom = _oom_kills(leaf) > 0
        self._stale.append(leaf)
        self.sweep()
        return oom

    def sweep(self) -> None:
        """Remove leaves whose processes are all gone (rmdir fails while any remain)."""
        left = []
        for leaf in self._stale:
            try:
                os.rmdir(leaf)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(leaf)
        self._stale = left

    def remove_all(self) -> None:
        self._stale.extend(self._leaves.values())
        self._leaves.clear()
        self.sweep()
        try:
            os.rmdir(self.base)
        except OSError:
            pass


def detect(warden_pid: int) -> tuple[MemoryCgroups | None, str]:
    """Make the warden's cgroup directory if this host allows it.

    Returns:
        (cgroups, description): cgroups is None when unavailable, and description
        says what is in force or why not (for ``stats()`` and the start-up warning).
    """
    own = _own_v1_path()
    if own is None or not os.path.isdir(_V1_ROOT):
        return None, "no cgroup v1 memory controller on this host (cgroup v2 is not used yet)"
    parent = os.path.join(_V1_ROOT, own.lstrip("/"))
    _remove_stale(parent)
    base = os.path.join(parent, f"corral-{warden_pid}")
    try:
        os.mkdir(base)
    except OSError as exc:
        return None, f"cannot create a memory cgroup under {parent}: {exc.strerror} (not root?)"
    return MemoryCgroups(base), f"cgroup v1 memory ({base})"


def _remove_stale(parent: str) -> None:
    """Remove what a warden that was killed (and so could not clean up) left behind:
    ``corral-<pid>`` directories whose warden is gone and whose leaves are empty."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith("corral-") or not name[7:].isdigit():
            continue
        if os.path.exists(f"/proc/{name[7:]}"):
            continue  # that warden is alive (another supervisor on this host)
        base = os.path.join(parent, name)
        try:
            for leaf in os.listdir(base):
                if os.path.isdir(os.path.join(base, leaf)):
                    os.rmdir(os.path.join(base, leaf))
            os.rmdir(base)
        except OSError:
            pass  # still populated, or not ours to remove


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _oom_kills(leaf: str) -> int:
    try:
        with open(os.path.join(leaf, "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    # Older kernels have no oom_kill line: a failcnt at the limit is the next best sign.
    try:
        with open(os.path.join(leaf, "memory.failcnt")) as f:
            return 1 if int(f.read()) > 0 else 0
    except (OSError, ValueError):
        return 0
