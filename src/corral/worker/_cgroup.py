"""Per-worker cgroups, managed by the warden (child side): cgroup v2 or v1, per controller.

A memory cgroup is the only limit the kernel enforces on a whole process tree and that
a kernel cannot catch: past it, the OOM killer acts. A pids cgroup bounds processes and
threads together, for root too. And a cgroup is the one handle on a worker's tree that
its members cannot leave by forking, ``setsid`` or reparenting: what a worker starts is
counted against it and dies with it.

The warden makes one directory of its own (``corral-<warden pid>``) in each hierarchy it
uses and one leaf per worker inside; the forked child moves itself into its leaves before
any kernel code runs. Every worker gets a memory leaf when a memory controller is usable
(its accounting, and its hard limit if it has one); a pids leaf when it asks for a bounded
tree (``cgroup_tree``). When the worker is reaped the warden kills every process left in
its leaves (``cgroup.kill`` on v2, else SIGKILL to each member until none is left), reads
the OOM-kill count, and removes them.

Which hierarchy, per controller (:func:`detect`): cgroup v2 where the warden's own v2
cgroup offers the controller and a subtree can be delegated to corral (see
:func:`_setup_v2` and ARCHITECTURE.md, "cgroup v2"); otherwise the v1 hierarchy of that
controller (hybrid hosts bind memory and pids to v1); otherwise none, with the reason
(the supervisor falls back to ``RLIMIT_DATA`` and tree RSS, and says so). On a pure v2
host one leaf per worker carries both controllers.

Does not cover: reading a worker's memory (the supervisor's probe reads the leaf the
warden reports in ``WorkerSpawned``) or the other sandbox layers (``_sandbox``).

Long because cgroup v1 and v2 differ per controller (memory, pids), and detection,
delegation, leaves, OOM counts, whole-tree kills and stale cleanup each need both.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = ["CONTROLLERS", "Cgroups", "Hierarchy", "Leaves", "detect"]

CONTROLLERS = ("memory", "pids")
_KILL_ROUNDS = 64  # v1 kill loop: rounds while members remain (a fork racing the kill)


class Hierarchy:
    """The warden's directory in one mounted hierarchy, and how to act on leaves there.

    Args:
        version: 1 or 2.
        base: the warden's directory, e.g. ``/sys/fs/cgroup/memory/<own>/corral-1234``.
        controllers: the controllers its leaves have (``{"memory", "pids"}`` on a v2 host,
            one on v1).
    """

    def __init__(self, version: int, base: str, controllers: Iterable[str]) -> None:
        self.version = version
        self.base = base
        self.controllers = frozenset(controllers)
        self._next = 0

    def describe(self, controller: str) -> str:
        return f"cgroup v{self.version} {controller} ({self.base})"

    def new_leaf(self, settings: Mapping[str, str]) -> str:
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

    def kill(self, leaf: str) -> None:
        """SIGKILL every process in ``leaf``: the worker's whole tree, descendants that
        left its session or were reparented included. v2: one write to ``cgroup.kill``,
        which the kernel applies atomically (forks racing it land in the leaf and die);
        v1, or a kernel before 5.14: SIGKILL each member, again while members remain
        (bounded; a pids leaf bounds the forks)."""
        if self.version == 2:
            try:
                _write(os.path.join(leaf, "cgroup.kill"), "1")
                return
            except OSError:  # no cgroup.kill (before 5.14): the loop below
                pass
        kill_members(leaf)

    def memory_settings(self, limit: int | None) -> dict[str, str]:
        """A hard limit on memory, and on memory + swap, so that swap cannot extend it.
        v2 also makes the OOM killer take the whole leaf at once (``memory.oom.group``):
        a bomb's worker dies with its children, not one child at a time."""
        if limit is None:
            return {}
        if self.version == 2:
            return {"memory.max": str(limit), "memory.swap.max": "0", "memory.oom.group": "1"}
        return {"memory.limit_in_bytes": str(limit), "memory.memsw.limit_in_bytes": str(limit)}

    def oom_kills(self, leaf: str) -> int:
        """How many processes the OOM killer took in ``leaf``."""
        if self.version == 2:
            return _keyed(os.path.join(leaf, "memory.events")).get("oom_kill", 0)
        counts = _keyed(os.path.join(leaf, "memory.oom_control"))
        if "oom_kill" in counts:
            return counts["oom_kill"]
        # Older kernels have no oom_kill line: a failcnt at the limit is the next best sign.
        try:
            with open(os.path.join(leaf, "memory.failcnt")) as f:
                return 1 if int(f.read()) > 0 else 0
        except (OSError, ValueError):
            return 0


class Leaves(NamedTuple):
    """A worker's leaves: one per hierarchy in use; ``memory`` is the one whose memory
    controller counts it (None without memory cgroups)."""

    paths: tuple[str, ...]
    memory: str | None


class Cgroups:
    """Every hierarchy the warden uses, and how to make, kill and remove workers' leaves.

    ``memory`` and ``pids`` are the hierarchies that provide those controllers (the same
    object on a v2 host, two v1 ones on a hybrid host, None where unavailable); the
    details say what is in force or why not (for the warden's hello and ``stats()``).
    A worker's leaves belong to the warden's record of it (``_children.Worker``), which
    passes them in here; this keeps only leaves already given up, until they can go.
    """

    def __init__(
        self,
        memory: Hierarchy | None,
        memory_detail: str,
        pids: Hierarchy | None,
        pids_detail: str,
    ) -> None:
        self.memory = memory
        self.memory_detail = memory_detail
        self.pids = pids
        self.pids_detail = pids_detail
        # Leaves of reaped workers, removed once their last process is reaped too, e.g.
        # ["/sys/fs/cgroup/pids/corral-1234/w7"].
        self._stale: list[str] = []

    @property
    def hierarchies(self) -> list[Hierarchy]:
        out: list[Hierarchy] = []
        for h in (self.memory, self.pids):
            if h is not None and h not in out:
                out.append(h)
        return out

    def make(self, *, memory_limit: int | None, max_processes: int | None) -> Leaves:
        """The leaves of a new worker: a memory leaf whenever memory cgroups are usable
        (with ``memory_limit`` as its hard limit, if set), and a pids leaf with
        ``pids.max`` = ``max_processes`` if set; one leaf when one hierarchy has both.

        Raises:
            OSError: a limit was asked for that no cgroup here can enforce, or the
                kernel refused (nothing is left behind).
        """
        if memory_limit is not None and self.memory is None:
            raise OSError(errno.ENOTSUP, f"no memory cgroups: {self.memory_detail}")
        if max_processes is not None and self.pids is None:
            raise OSError(errno.ENOTSUP, f"no pids cgroups: {self.pids_detail}")
        wanted: dict[Hierarchy, dict[str, str]] = {}
        if self.memory is not None:
            wanted[self.memory] = self.memory.memory_settings(memory_limit)
        if max_processes is not None and self.pids is not None:
            wanted.setdefault(self.pids, {})["pids.max"] = str(max_processes)
        made: list[str] = []
        memory_leaf = None
        try:
            for hierarchy, settings in wanted.items():
                leaf = hierarchy.new_leaf(settings)
                made.append(leaf)
                if hierarchy is self.memory:
                    memory_leaf = leaf
        except OSError:
            self.discard(Leaves(tuple(made), None))
            raise
        return Leaves(tuple(made), memory_leaf)

    @staticmethod
    def join(leaves: Leaves) -> None:
        """Move the calling process (the forked child) into its leaves."""
        for leaf in leaves.paths:
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))

    @staticmethod
    def discard(leaves: Leaves) -> None:
        """Remove the leaves of a worker that was never started."""
        for leaf in leaves.paths:
            try:
                os.rmdir(leaf)
            except OSError:
                pass

    def kill_tree(self, leaves: Leaves) -> None:
        """SIGKILL everything in a worker's leaves (its escaped descendants too)."""
        for leaf in leaves.paths:
            self._owner(leaf).kill(leaf)

    def reaped(self, leaves: Leaves) -> bool:
        """The worker that had ``leaves`` was reaped: kill what is left in them, give them
        up (removed now, or once their last process is reaped), and say whether the OOM
        killer acted in its memory leaf."""
        if not leaves.paths:
            return False
        oom = False
        for leaf in leaves.paths:
            owner = self._owner(leaf)
            owner.kill(leaf)
            if leaf == leaves.memory:
                oom = owner.oom_kills(leaf) > 0
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

    def kill_all(self, workers: Iterable[Leaves]) -> None:
        """:meth:`kill_tree` for each of ``workers`` (the leaves of every live worker)."""
        for leaves in workers:
            self.kill_tree(leaves)

    def remove_all(self, workers: Iterable[Leaves]) -> None:
        """At the warden's exit, once no process is left: remove ``workers`` (the leaves
        of workers not reaped through :meth:`reaped`), every leaf given up, and the
        warden's directories."""
        for leaves in workers:
            self._stale.extend(leaves.paths)
        self.sweep()
        for hierarchy in self.hierarchies:
            try:
                os.rmdir(hierarchy.base)
            except OSError:
                pass

    def _owner(self, leaf: str) -> Hierarchy:
        parent = os.path.dirname(leaf)
        for hierarchy in self.hierarchies:
            if hierarchy.base == parent:
                return hierarchy
        raise AssertionError(f"{leaf} is not one of ours")  # a bug: leaves come from make()


def kill_members(leaf: str) -> None:
    """SIGKILL each process listed in ``leaf``, again while any remain (bounded)."""
    for _ in range(_KILL_ROUNDS):
        procs = _procs(leaf)
        if not procs:
            return
        for member in procs:
            try:
                os.kill(member, signal.SIGKILL)
            except OSError:  # gone (or not ours to signal)
                pass


# -- detection -------------------------------------------------------------------------------


class _Mount(NamedTuple):
    point: str  # where it is mounted, e.g. /sys/fs/cgroup/unified
    root: str  # the cgroup path that mount point shows, e.g. "/"


class Host(NamedTuple):
    """What the process sees: its cgroup paths and the mounts, as read from ``/proc``."""

    v2_path: str | None  # "0::/path" in /proc/self/cgroup
    v1_paths: dict[str, str]  # controller -> its path in /proc/self/cgroup
    v2_mount: _Mount | None
    v1_mounts: dict[str, _Mount]  # controller -> the v1 mount holding it


def read_host(proc_self: str = "/proc/self") -> Host:
    """Parse ``cgroup`` and ``mountinfo`` under ``proc_self`` (tests give a fake one)."""
    v2_path: str | None = None
    v1_paths: dict[str, str] = {}
    try:
        with open(os.path.join(proc_self, "cgroup")) as f:
            for line in f:
                number, controllers, path = line.rstrip("\n").split(":", 2)
                if number == "0" and controllers == "":
                    v2_path = path
                else:
                    for name in controllers.split(","):
                        v1_paths.setdefault(name, path)
    except (OSError, ValueError):
        pass
    v2_mount: _Mount | None = None
    v1_mounts: dict[str, _Mount] = {}
    try:
        with open(os.path.join(proc_self, "mountinfo")) as f:
            for line in f:
                # "36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup
                # rw,memory": root and mount point are fields 4 and 5; after " - " come the
                # type, the source and the superblock options.
                head, sep, tail = line.rstrip("\n").partition(" - ")
                fields, rest = head.split(" "), tail.split(" ")
                if not sep or len(fields) < 5 or len(rest) < 3:
                    continue
                mount = _Mount(_unescape(fields[4]), _unescape(fields[3]))
                if rest[0] == "cgroup2" and v2_mount is None:
                    v2_mount = mount
                elif rest[0] == "cgroup":
                    for option in rest[2].split(","):
                        if option in CONTROLLERS:
                            v1_mounts.setdefault(option, mount)
    except OSError:
        pass
    return Host(v2_path, v1_paths, v2_mount, v1_mounts)


def detect(
    warden_pid: int, host: Host | None = None, *, memory: bool = True, v2: bool = True
) -> Cgroups:
    """Make the warden's directories for the memory and pids controllers, each in v2
    where this host allows it, else in v1, else none (with the reason).

    Args:
        warden_pid: names the directories (``corral-<pid>``), so a later warden can tell
            a dead warden's leftovers (see :func:`_remove_stale`).
        host: what ``/proc/self`` says (read here when None).
        memory: False for no memory cgroups at all (``memory_method="rlimit"``).
        v2: False to try v1 only.
    """
    host = read_host() if host is None else host
    wanted = [c for c in CONTROLLERS if memory or c != "memory"]
    found: dict[str, Hierarchy] = {}
    why = {} if memory else {"memory": "not requested (memory_method='rlimit')"}
    own_v2 = _locate(host.v2_mount, host.v2_path)
    if v2 and own_v2 is not None:
        unified, reason = _setup_v2(own_v2, set(wanted), warden_pid)
        for controller in wanted:
            if unified is not None and controller in unified.controllers:
                found[controller] = unified
            else:
                why[controller] = reason or f"cgroup v2 ({own_v2}) has no {controller} controller"
    for controller in wanted:
        if controller in found:
            continue
        v1, reason = _setup_v1(host, controller, warden_pid)
        if v1 is not None:
            found[controller] = v1
        else:
            why[controller] = "; ".join(filter(None, (why.get(controller), reason)))
    for_memory, for_pids = found.get("memory"), found.get("pids")
    return Cgroups(
        for_memory,
        for_memory.describe("memory") if for_memory is not None else why["memory"],
        for_pids,
        for_pids.describe("pids") if for_pids is not None else why["pids"],
    )


def _setup_v1(host: Host, controller: str, warden_pid: int) -> tuple[Hierarchy | None, str]:
    own = _locate(host.v1_mounts.get(controller), host.v1_paths.get(controller))
    if own is None:
        return None, f"no cgroup v1 {controller} hierarchy"
    _remove_stale(own)
    base = os.path.join(own, f"corral-{warden_pid}")
    try:
        os.mkdir(base)
    except OSError as exc:
        why = f"cannot create a v1 {controller} cgroup under {own}: {exc.strerror}"
        return None, why + " (not root?)"
    return Hierarchy(1, base, {controller}), ""


def _setup_v2(own: str, wanted: set[str], warden_pid: int) -> tuple[Hierarchy | None, str]:
    """The warden's v2 directory, with as many of ``wanted`` as can be delegated to it.

    cgroup v2 lets a cgroup other than the root hand controllers to its children only
    while it holds no process ("no internal processes"). The warden's own cgroup ``own``
    also holds the host that started it, so the directory goes where the controllers
    can reach it:

    1. ``own`` already enables them for its children (it is the root, or delegates):
       ``own/corral-<pid>``;
    2. the warden is alone in ``own``: it moves into a leaf of its own,
       ``own/corral-<pid>/warden``, and enables them in ``own``;
    3. the parent of ``own`` is a subtree delegated to this service (systemd marks one
       with the ``trusted.delegate`` or ``user.delegate`` attribute; with
       ``DelegateSubgroup=`` the host runs in a child of it): ``parent/corral-<pid>``;
    4. otherwise none (the reason names ``own`` and the fix): the supervisor then falls
       back as on a host without cgroups.

    Then the directory enables the controllers for the workers' leaves (it holds no
    process itself: the warden is in ``own`` or in its ``warden`` leaf).
    """
    offered = _words(os.path.join(own, "cgroup.controllers")) & wanted
    if not offered:
        return None, f"cgroup v2 ({own}) offers no {' or '.join(sorted(wanted))} controller"
    enabled = _words(os.path.join(own, "cgroup.subtree_control"))
    is_root = not os.path.exists(os.path.join(own, "cgroup.type"))  # not on the root
    parent, move_self = own, False
    if offered <= enabled or is_root:
        pass
    elif _procs(own) == [warden_pid]:
        move_self = True
    elif _is_delegated(os.path.dirname(own)):
        parent = os.path.dirname(own)
    else:
        return None, (
            f"cgroup v2: {own} holds other processes (the host's), so it cannot hand "
            f"{'/'.join(sorted(offered))} to corral; run the host in a cgroup of its own "
            "under a delegated one (systemd: Delegate=yes with DelegateSubgroup=)"
        )
    _remove_stale(parent)
    base = os.path.join(parent, f"corral-{warden_pid}")
    try:
        os.mkdir(base)
    except OSError as exc:
        return None, f"cannot create a v2 cgroup under {parent}: {exc.strerror} (not root?)"
    try:
        if move_self:
            os.mkdir(os.path.join(base, "warden"))
            _write(os.path.join(base, "warden", "cgroup.procs"), str(warden_pid))
        if parent == own and offered - enabled:
            _enable(own, offered - enabled)
        _enable(base, offered)
    except OSError as exc:
        for path in (os.path.join(base, "warden"), base):
            _rmdir_quiet(path)  # (the warden's leaf stays if it could move there)
        controllers = "/".join(sorted(offered))
        return None, f"cgroup v2: cannot delegate {controllers} to {base}: {exc.strerror}"
    return Hierarchy(2, base, offered), ""


def _is_delegated(path: str) -> bool:
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            pass
    return False


def _enable(cgroup: str, controllers: set[str]) -> None:
    _write(
        os.path.join(cgroup, "cgroup.subtree_control"),
        " ".join(f"+{name}" for name in sorted(controllers)),
    )


def _locate(mount: _Mount | None, path: str | None) -> str | None:
    """The directory of cgroup ``path`` under ``mount``, if that mount shows it."""
    if mount is None or path is None:
        return None
    root = mount.root.rstrip("/")
    if path != mount.root and not path.startswith(root + "/"):
        return None
    where = os.path.join(mount.point, path[len(root) :].lstrip("/"))
    return (where.rstrip("/") or "/") if os.path.isdir(where) else None


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
                    try:
                        _write(os.path.join(path, "cgroup.kill"), "1")
                    except OSError:  # v1, or an old kernel
                        kill_members(path)  # survivors of that warden's workers
                    os.rmdir(path)
            os.rmdir(base)
        except OSError:
            pass  # still populated (killed processes not reaped yet), or not ours


def _procs(leaf: str) -> list[int]:
    try:
        with open(os.path.join(leaf, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _words(path: str) -> set[str]:
    try:
        with open(path) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file ("key value" per line) as a dict."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                try:
                    out[key] = int(value)
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \040 \011 \012 \134."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
