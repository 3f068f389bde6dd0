"""The message types of corral's two channels, as frozen msgspec Structs.

Covers: the worker channel (supervisor <-> one worker, over a pair of pipes)
and the warden channel (supervisor <-> the process that forks workers, over a
``SOCK_SEQPACKET`` socket carrying pipe fds). Does not cover: how bytes move
(see :mod:`corral.ipc.framing`) or what either side does with a message.

Structs are ``array_like`` (compact, fast) and tagged; a decoder built from a
union rejects unknown tags, wrong types and extra fields. Plugin payloads are
``msgspec.Raw`` so that the envelope is decoded strictly and the payload only
by whoever needs it (a call's arguments, by the worker, which reports bad ones per
call); a result's value is decoded with its envelope.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION",
    "Bind",
    "Call",
    "CallFailed",
    "ErrorKind",
    "FromWarden",
    "FromWorker",
    "Hello",
    "KillWorker",
    "LayerCheck",
    "RemoteError",
    "Result",
    "SandboxSpec",
    "Shutdown",
    "SpawnFailed",
    "SpawnWorker",
    "Start",
    "StartFailed",
    "ToWarden",
    "ToWorker",
    "WardenHello",
    "WorkerExited",
    "WorkerSpawned",
]


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag=True, forbid_unknown_fields=True):
    pass


# --- worker channel: supervisor -> worker -------------------------------------------------


class Start(_Msg, frozen=True, tag="start"):
    """First message to a new worker: what to load and for whom (``tenant`` "" for a
    spare: it loads the factory now, says Hello, and calls the factory once
    :class:`Bind` names its tenant)."""

    tenant: str
    factory: str | None  # "pkg.module:callable", or None when factory_blob is set
    factory_blob: bytes | None  # a dill-serialised callable (supervisor -> worker only)
    sys_path: list[str]
    max_frame_bytes: int


class Call(_Msg, frozen=True, tag="call"):
    """Invoke ``kernel.<method>(*args, **kwargs)``; ``args`` is msgpack ``[args, kwargs]``."""

    id: int
    method: str
    args: msgspec.Raw


class Bind(_Msg, frozen=True, tag="bind"):
    """A spare's tenant (the second message to a spare, after ``Start`` and the spare's
    first Hello): the worker calls the factory it loaded for ``tenant`` and answers a
    second Hello, or StartFailed."""

    tenant: str


class Shutdown(_Msg, frozen=True, tag="shutdown"):
    """Run the kernel's ``shutdown()`` hook, then exit."""


ToWorker = Start | Bind | Call | Shutdown


# --- worker channel: worker -> supervisor (untrusted) -------------------------------------


class RemoteError(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """An exception raised in the worker, as text only."""

    type_name: str
    message: str
    traceback: str


class Hello(_Msg, frozen=True, tag="hello"):
    """The kernel is loaded; the worker serves calls from now on."""

    protocol_version: int
    pid: int
    host_pid: int | None  # the same process as the host sees it, where that differs
    # (a PID namespace: pid is 2 there); None: pid is the host's


class StartFailed(_Msg, frozen=True, tag="start_failed"):
    """The factory could not be loaded or raised; the worker exits after this."""

    error: RemoteError


class Result(_Msg, frozen=True, tag="result"):
    """The return value of call ``id``: any msgpack value. The worker encodes value and
    envelope in one pass; the supervisor decodes the envelope with the value left as
    its bytes (checked to be one whole msgpack value, no object made), then decodes
    those straight into what the caller asked for (any value, or a ``result_type``)."""

    id: int
    value: msgspec.Raw


ErrorKind = Literal["kernel", "method", "arguments", "result"]


class CallFailed(_Msg, frozen=True, tag="failed"):
    """Call ``id`` failed: the kernel raised (``kernel``), the method is unknown or
    private (``method``), the arguments did not decode (``arguments``) or the
    result could not be encoded (``result``)."""

    id: int
    kind: ErrorKind
    error: RemoteError


FromWorker = Hello | StartFailed | Result | CallFailed


# --- warden channel -------------------------------------------------------------------------


class SandboxSpec(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The unprivileged sandbox layers a worker applies before its kernel loads."""

    rlimits: list[tuple[str, int]]  # ("core" | "cpu" | "nofile" | "fsize", limit)
    scratch: bool  # a fresh private directory as cwd, HOME and TMPDIR, removed afterwards
    no_new_privs: bool
    landlock: bool
    seccomp: bool
    read_paths: list[str]  # readable (and executable) under Landlock
    cgroup_tree: bool  # a pids cgroup for the worker's tree: bounds forks and threads, and
    # lets the warden kill the whole tree (setsid'd descendants too)
    max_processes: int  # pids.max of that cgroup; RLIMIT_NPROC with a dedicated uid
    uid_range: tuple[int, int] | None  # (first uid, count): a uid/gid of its own per worker
    namespaces: bool  # pid 1 of its own PID namespace, private mount/net/IPC/UTS namespaces
    shm_bytes: int  # size of the private /dev/shm (with namespaces)
    drop_capabilities: bool  # empty every capability set, the bounding set included
    scratch_bytes: int | None  # the scratch dir is a tmpfs of this size (root only)
    scratch_inodes: int | None  # ... with at most this many files and directories


class SpawnWorker(_Msg, frozen=True, tag="spawn"):
    """Start a worker on the three fds sent with this message (in, out, log).

    ``exec`` selects a fresh interpreter (fork + exec) over a plain fork of the warden.
    ``memory_limit`` (bytes) is enforced by the OS: a memory cgroup of its own when the
    warden has them and ``memory_method`` allows (``"cgroup"``), else ``RLIMIT_DATA``
    (``"rlimit"``).
    """

    id: int
    exec: bool
    memory_limit: int | None
    memory_method: Literal["cgroup", "rlimit"]
    sandbox: SandboxSpec


class KillWorker(_Msg, frozen=True, tag="kill"):
    """Send ``signal`` to the worker's process group (and, for SIGKILL, its descendants)."""

    pid: int
    signal: int


ToWarden = SpawnWorker | KillWorker


class LayerCheck(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What one sandbox layer would be on the warden's host, as the warden found it.

    ``available``: a worker that asks for the layer gets it. ``detail``: how, if there
    is more to say (e.g. ``"ABI 4"``, ``"uids from 200000000"``), or why not (e.g.
    ``"needs root"``); shown as is in ``stats().sandbox``.
    """

    available: bool
    detail: str  # "" when there is nothing to add


class WardenHello(_Msg, frozen=True, tag="warden_hello"):
    protocol_version: int
    pid: int
    memory_cgroups: bool  # per-worker memory cgroups are available
    memory_cgroups_detail: str  # what is in force, or why cgroups are not
    sandbox_layers: dict[str, LayerCheck]  # layer -> what it would be, e.g.
    # {"landlock": LayerCheck(True, "ABI 4"), "namespaces": LayerCheck(False, "needs root")}


class WorkerSpawned(_Msg, frozen=True, tag="spawned"):
    """Spawn ``id`` started as ``pid``. ``memory_cgroup``: the directory of its memory
    cgroup leaf (v1 or v2), which counts everything it starts wherever that goes; the
    supervisor reads its memory there. None: no memory cgroup (tree RSS is used)."""

    id: int
    pid: int
    memory_cgroup: str | None


class SpawnFailed(_Msg, frozen=True, tag="spawn_failed"):
    id: int
    message: str


class WorkerExited(_Msg, frozen=True, tag="exited"):
    """The warden reaped worker ``pid``; ``returncode`` < 0 is a signal number;
    ``oom_killed``: the OOM killer acted in the worker's memory cgroup."""

    pid: int
    returncode: int
    oom_killed: bool


FromWarden = WardenHello | WorkerSpawned | SpawnFailed | WorkerExited
