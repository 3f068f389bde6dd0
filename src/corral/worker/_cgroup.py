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
import signal

__all__ = ["Cgroups", "detect", "memory_settings", "oom_killed"]


def _own_v1_path(controller: str) -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _num, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    return path
    except OSError:
        return None
    return None


class Cgroups:
    """The warden's own directory under one v1 controller and its per-worker leaves."""

    def __init__(self, base: str) -> None:
        self.base = base  # e.g. /sys/fs/cgroup/memory/<own>/corral-1234
        self._leaves: dict[int, str] = {}  # worker pid -> leaf path
        self._stale: list[str] = []  # leaves to remove once their last process is gone
        self._next = 0

    def new_leaf(self, settings: dict[str, str]) -> str:
        """Create a leaf, write ``settings`` (file -> value; a file that does not exist is
        skipped, e.g. memsw without swap accounting), and return its path."""
        self._next += 1
        leaf = os.path.join(self.base, f"w{self._next}")
        os.mkdir(leaf)
        try:
            for name, value in settings.items():
                path = os.path.join(leaf, name)
                if os.path.exists(path):
                    _write(path, value)
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

    def kill_tree(self, pid: int) -> None:
        """SIGKILL every process left in the worker's leaf: its whole tree, including
        descendants that left its session. Repeats while processes remain (a fork racing
        the kill lands in the same leaf); bounded, as the leaf's pids.max bounds forks."""
        leaf = self._leaves.get(pid)
        if leaf is None:
            return
        for _ in range(64):
            procs = _procs(leaf)
            if not procs:
                return
            for member in procs:
                try:
                    os.kill(member, signal.SIGKILL)
                except OSError:  # gone (or not ours to signal)
                    pass

    def release(self, pid: int) -> str | None:
        """The worker was reaped: forget its leaf and remove it (now, or once the last
        process in it is gone). Returns the leaf path (to read counters first)."""
        leaf = self._leaves.pop(pid, None)
        if leaf is not None:
            self._stale.append(leaf)
        return leaf

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

    def kill_all(self) -> None:
        for pid in list(self._leaves):
            self.kill_tree(pid)

    def remove_all(self) -> None:
        self._stale.extend(self._leaves.values())
        self._leaves.clear()
        self.sweep()
        try:
            os.rmdir(self.base)
        except OSError:
            pass


def memory_settings(limit: int) -> dict[str, str]:
    """A hard limit on memory and on memory+swap (the latter only with swap accounting)."""
    return {"memory.limit_in_bytes": str(limit), "memory.memsw.limit_in_bytes": str(limit)}


def oom_killed(leaf: str) -> bool:
    """Whether the OOM killer acted in this memory leaf."""
    return _oom_kills(leaf) > 0


def _procs(leaf: str) -> list[int]:
    try:
        with open(os.path.join(leaf, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def detect(controller: str, warden_pid: int) -> tuple[Cgroups | None, str]:
    """Make the warden's directory under a v1 ``controller`` if this host allows it.

    Returns:
        (cgroups, description): cgroups is None when unavailable, and description
        says what is in force or why not (for ``stats()`` and the start-up warning).
    """
    own = _own_v1_path(controller)
    root = f"/sys/fs/cgroup/{controller}"
    if own is None or not os.path.isdir(root):
        return (
            None,
            f"no cgroup v1 {controller} controller on this host (cgroup v2 is not used yet)",
        )
    parent = os.path.join(root, own.lstrip("/"))
    _remove_stale(parent)
    base = os.path.join(parent, f"corral-{warden_pid}")
    try:
        os.mkdir(base)
    except OSError as exc:
        return (
            None,
            f"cannot create a {controller} cgroup under {parent}: {exc.strerror} (not root?)",
        )
    return Cgroups(base), f"cgroup v1 {controller} ({base})"


def _remove_stale(parent: str) -> None:
    """Remove what a warden that was killed (and so could not clean up) left behind:
    ``corral-<pid>`` directories whose warden is gone, killing what still runs in them."""
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
                path = os.path.join(base, leaf)
                if os.path.isdir(path):
                    for member in _procs(path):  # survivors of that warden's workers
                        try:
                            os.kill(member, signal.SIGKILL)
                        except OSError:  # gone (or not ours to signal)
                            pass
                    os.rmdir(path)
            os.rmdir(base)
        except OSError:
            pass  # still populated (killed processes not reaped yet), or not ours


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
