"""What isolation a worker gets: :class:`Sandbox` and its presets.

The layers a worker can get, from cheapest to strongest:

* always (part of how corral starts workers): environment allowlist set at exec,
  only the protocol fds open, stdio captured, a session of its own, a parent-death
  signal, and a memory cgroup or rlimit when memory limits are set;
* ``Sandbox.default()`` adds, best effort: a private scratch directory as cwd
  (removed afterwards; as root a size- and inode-limited nosuid,nodev tmpfs), resource
  limits (no core dumps, open files, file size), every capability dropped (as root),
  no-new-privs, Landlock (filesystem read-only outside the scratch dir, no other
  process's /proc entries, no TCP, signals and abstract unix sockets scoped to the
  worker) where the kernel has it, a seccomp filter (no sockets but AF_UNIX pairs, no
  acting on other processes, no setuid/setgid modes, no ptrace, mount, namespaces,
  bpf, io_uring, keyrings, ...), applied last; and as root a uid of its own per
  worker and a cgroup bounding its processes and threads;
* ``Sandbox.strict()`` requires the root-only layers: a cgroup per worker for the
  whole tree (pids limit, whole-tree kill), a dedicated uid/gid per worker (it can
  neither signal nor read other processes; RLIMIT_NPROC applies), and PID, mount,
  network, IPC and UTS namespaces (pid 2 under a tiny init; a private /proc and a
  size-limited private /dev/shm; no network at all). Where a layer is missing,
  ``strict()`` refuses to start, naming it, unless ``best_effort=True`` is given.

:meth:`Sandbox.resolve` turns a sandbox and what the host supports (reported by
the warden) into the spec a worker applies and a per-layer report for
``stats().sandbox``; a required layer that is missing is an error, never a silent
downgrade.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import msgspec

from corral.ipc import LayerCheck, SandboxSpec
from corral.supervisor.records import LayerStatus

__all__ = ["Sandbox", "SandboxUnavailableError"]


SCRATCH_BYTES = 128 * 2**20  # the presets' scratch tmpfs (root): small beside any disk


class SandboxUnavailableError(Exception):
    """A layer the sandbox requires is not available on this host."""


class Sandbox(msgspec.Struct, frozen=True, kw_only=True):
    """Isolation for tenant kernels. Use a preset and adjust with ``msgspec.structs.replace``.

    Attributes:
        scratch_dir: a fresh private directory as the worker's cwd, HOME and TMPDIR.
        scratch_bytes: as root, the scratch dir is a tmpfs of this many bytes (mounted
            nosuid,nodev; its pages count against the worker's memory cgroup); a kernel
            that fills it gets ``OSError(ENOSPC)`` and goes on. None (the class
            default; the presets use 128 MiB): a plain directory.
        scratch_inodes: the most files and directories that tmpfs holds.
        rlimits: hard resource limits by name ("core", "cpu", "nofile", "fsize"). "cpu"
            counts a worker's whole life, so it is off by default (call timeouts bound
            each call).
        no_new_privs: setuid binaries gain nothing.
        landlock: filesystem, TCP and signal/abstract-socket scoping (kernel >= 5.13).
        seccomp: the syscall filter (see ARCHITECTURE.md for what it allows).
        drop_capabilities: a worker started by a root host drops every capability
            (effective, permitted, inheritable, ambient and the bounding set) and can
            never regain one at exec.
        extra_read_paths: more paths the kernel may read under Landlock.
        dedicated_uid: each live worker runs as a uid/gid of its own from
            ``uid_range`` (root). The interpreter, corral and the kernel's code must
            be readable by other users (not in a private home directory).
            ``RLIMIT_NPROC`` is set to ``max_processes``.
        cgroup_tree: a pids cgroup per worker (root): at most ``max_processes``
            processes and threads in its tree, and the whole tree, setsid'd
            descendants included, is killed when the worker stops.
        namespaces: the worker is pid 2 of its own PID namespace under a tiny init
            (when it exits, everything left in the namespace is killed), with private
            mount, network (no interfaces up), IPC and UTS namespaces, a private
            ``/proc`` and a ``shm_bytes`` tmpfs on ``/dev/shm`` (root).
        uid_range: ``(first uid, count)`` reserved for workers; used only by corral.
        best_effort: apply what the host supports and report the rest, instead of
            refusing to start.
    """

    scratch_dir: bool = True
    scratch_bytes: int | None = None
    scratch_inodes: int = 16_384
    rlimits: dict[str, int] = msgspec.field(
        default_factory=lambda: {"core": 0, "nofile": 1024, "fsize": 1 << 30}
    )
    no_new_privs: bool = True
    landlock: bool = True
    seccomp: bool = True
    drop_capabilities: bool = True
    extra_read_paths: tuple[str, ...] = ()
    dedicated_uid: bool = False
    cgroup_tree: bool = False
    max_processes: int = 256
    namespaces: bool = False
    uid_range: tuple[int, int] = (200_000_000, 65_536)
    shm_bytes: int = 64 * 2**20
    best_effort: bool = False

    @classmethod
    def none(cls) -> Sandbox:
        """No isolation beyond the process boundary (trusted code)."""
        return cls(
            scratch_dir=False,
            rlimits={},
            no_new_privs=False,
            landlock=False,
            seccomp=False,
            drop_capabilities=False,
        )

    @classmethod
    def default(cls) -> Sandbox:
        """Every layer the host supports but namespaces, best effort: as root that
        includes a uid of its own per worker, a pids cgroup and a size-limited scratch
        tmpfs; without root each of those is reported unavailable (with a warning)."""
        return cls(
            dedicated_uid=True, cgroup_tree=True, scratch_bytes=SCRATCH_BYTES, best_effort=True
        )

    @classmethod
    def strict(cls) -> Sandbox:
        """``default()`` plus namespaces, every layer required."""
        return cls(
            dedicated_uid=True, cgroup_tree=True, namespaces=True, scratch_bytes=SCRATCH_BYTES
        )

    def requested(self) -> dict[str, bool]:
        return {
            "scratch_dir": self.scratch_dir,
            "scratch_quota": self.scratch_dir and self.scratch_bytes is not None,
            "capabilities": self.drop_capabilities,
            "rlimits": bool(self.rlimits),
            "no_new_privs": self.no_new_privs,
            "landlock": self.landlock,
            "seccomp": self.seccomp,
            "dedicated_uid": self.dedicated_uid,
            "cgroup_tree": self.cgroup_tree,
            "namespaces": self.namespaces,
        }

    def validate(self) -> None:
        """Raises ValueError for an unknown rlimit name or a negative limit."""
        for name, limit in self.rlimits.items():
            if name not in ("core", "cpu", "nofile", "fsize"):
                raise ValueError(f"Sandbox.rlimits: unknown limit {name!r}")
            if not isinstance(limit, int) or limit < 0:
                raise ValueError(f"Sandbox.rlimits[{name!r}] must be an int >= 0, got {limit!r}")
        if not isinstance(self.max_processes, int) or self.max_processes < 8:
            raise ValueError(
                f"Sandbox.max_processes must be an int >= 8, got {self.max_processes!r}"
            )
        if self.rlimits.get("nofile", 64) < 64:
            raise ValueError("Sandbox.rlimits['nofile'] below 64 leaves a worker no room to run")
        first, count = self.uid_range
        if not (isinstance(first, int) and isinstance(count, int)) or first < 1000 or count < 1:
            raise ValueError(
                f"Sandbox.uid_range must be (first >= 1000, count >= 1), got {self.uid_range!r}"
            )
        if first + count > 2**32 - 2:
            raise ValueError(f"Sandbox.uid_range {self.uid_range!r} goes past the largest uid")
        if self.scratch_bytes is not None and (
            not isinstance(self.scratch_bytes, int) or self.scratch_bytes < 1 << 20
        ):
            raise ValueError(
                f"Sandbox.scratch_bytes must be None or an int >= 1 MiB, got {self.scratch_bytes!r}"
            )
        if not isinstance(self.scratch_inodes, int) or self.scratch_inodes < 64:
            raise ValueError(
                f"Sandbox.scratch_inodes must be an int >= 64, got {self.scratch_inodes!r}"
            )
        if not isinstance(self.shm_bytes, int) or self.shm_bytes < 4096:
            raise ValueError(f"Sandbox.shm_bytes must be an int >= 4096, got {self.shm_bytes!r}")

    @property
    def needs_root_probe(self) -> bool:
        """Whether the host must be checked for the root-only layers this asks for."""
        return self.dedicated_uid or self.namespaces

    def resolve(self, host: Mapping[str, LayerCheck]) -> tuple[SandboxSpec, dict[str, LayerStatus]]:
        """The spec workers apply and what each layer is doing (:class:`LayerStatus`).

        Args:
            host: what the warden detected for each layer (available, with how or why
                not); a layer it did not report is unavailable.

        Raises:
            SandboxUnavailableError: a requested layer is unavailable and not best_effort.
        """
        detected = {
            "scratch_dir": LayerCheck(True, ""),
            "rlimits": LayerCheck(True, ""),
            "no_new_privs": LayerCheck(True, ""),
            **host,
        }
        report: dict[str, LayerStatus] = {}
        missing = []
        granted: dict[str, bool] = {}
        for layer, wanted in self.requested().items():
            check = detected.get(layer, LayerCheck(False, "unknown layer"))
            granted[layer] = wanted and check.available
            if not wanted:
                report[layer] = LayerStatus("off")
            elif check.available:
                report[layer] = LayerStatus("on", check.detail)
            else:
                report[layer] = LayerStatus("unavailable", check.detail)
                missing.append(f"{layer} ({check.detail})")
        if missing and not self.best_effort:
            raise SandboxUnavailableError(
                "the sandbox requires layers this host cannot provide: "
                + ", ".join(missing)
                + " (use best_effort=True to run with what is available)"
            )
        spec = SandboxSpec(
            rlimits=sorted(self.rlimits.items()) if granted["rlimits"] else [],
            scratch=granted["scratch_dir"],
            no_new_privs=granted["no_new_privs"],
            landlock=granted["landlock"],
            seccomp=granted["seccomp"],
            read_paths=_read_paths(self.extra_read_paths) if granted["landlock"] else [],
            cgroup_tree=granted["cgroup_tree"],
            max_processes=self.max_processes,
            uid_range=self.uid_range if granted["dedicated_uid"] else None,
            namespaces=granted["namespaces"],
            shm_bytes=self.shm_bytes,
            drop_capabilities=granted["capabilities"],
            scratch_bytes=self.scratch_bytes if granted["scratch_quota"] else None,
            scratch_inodes=self.scratch_inodes if granted["scratch_quota"] else None,
        )
        return spec, report


def _read_paths(extra: tuple[str, ...]) -> list[str]:
    """What a Python worker must be able to read (and execute) to run at all: the
    interpreter and its libraries, every import path, the C libraries, ``/proc``."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(sys.executable),
        *sys.path,
        "/usr",
        "/lib",
        "/lib64",
        "/bin",
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/etc/os-release",
        "/proc",
        "/dev/urandom",
        "/dev/random",
        "/sys/devices/system/cpu",
        *extra,
    ]
    # No filesystem calls here (this may run on the event loop): the worker opens each
    # path with O_PATH, which follows symlinks, and skips the ones that do not exist.
    # "/" (sys.path[0] when the host runs from the root directory) would make every
    # file readable while the report says Landlock is on: never grant it.
    out: list[str] = []
    for path in candidates:
        if path and path.rstrip("/") and path not in out:
            out.append(path)
    return out
