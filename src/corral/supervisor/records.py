"""What the supervisor reports: the public value types of its answers.

Covers: a worker's lifecycle state (:class:`WorkerState`), why and how it ended
(:class:`StopReason`, :class:`Rung`, :class:`StopReport`), a snapshot of one worker
(:class:`WorkerInfo`) and of the whole supervisor (:class:`SupervisorStats`), and what
one sandbox layer is doing (:class:`LayerStatus`). All are immutable and encode to
JSON or msgpack with msgspec as they are. Not here: the events a supervisor emits
(:mod:`corral.supervisor.events`) and who moves a worker between states
(:mod:`corral.supervisor._lifecycle`).
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

__all__ = [
    "LayerStatus",
    "Rung",
    "StopReason",
    "StopReport",
    "SupervisorStats",
    "WorkerInfo",
    "WorkerState",
]


class _FastEnum(enum.Enum):
    """Members hash by identity (they are singletons and compare by identity), in C:
    ``Enum.__hash__`` is Python code, and the transition table is hashed on every call."""

    __hash__ = object.__hash__


class WorkerState(_FastEnum):
    """Where a worker is in its life (see ``ARCHITECTURE.md`` for the diagram)."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


class StopReason(enum.Enum):
    """Why corral stopped a worker (or saw it die)."""

    LRU = "lru"  # evicted to make room for another tenant
    IDLE_TTL = "idle_ttl"
    EVICTED = "evicted"  # Supervisor.evict()
    CLOSED = "closed"  # Supervisor.aclose()
    CALL_TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"  # over worker_memory_limit (sampled): recycled after draining
    MEMORY_HARD_LIMIT = "memory_hard_limit"  # the OS stopped it at worker_memory_hard_limit
    HOST_PRESSURE = "host_pressure"  # available memory below min_available_memory
    TOTAL_MEMORY = "total_memory"  # all workers together above max_total_memory
    START_FAILED = "start_failed"
    START_TIMEOUT = "start_timeout"
    PROTOCOL_ERROR = "protocol_error"
    RELOADED = "reloaded"  # Supervisor.reload(): replaced by a worker started anew
    PIPE_CLOSED = "pipe_closed"  # it closed its pipe to the supervisor and lived on
    CRASHED = "crashed"  # it died without being asked
    # corral could not start a process (no fds, no warden): not the tenant's fault
    LAUNCH_FAILED = "launch_failed"
    WARDEN_DIED = "warden_died"  # its parent, the warden, died: not the tenant's fault


class Rung(enum.Enum):
    """How far termination had to go."""

    NONE = "none"  # it was already dead
    ASK = "ask"  # Shutdown message; the kernel's shutdown() ran
    TERM = "term"  # SIGTERM to the process group
    KILL = "kill"  # SIGKILL to the group and descendants


class StopReport(msgspec.Struct, frozen=True):
    """How a worker ended."""

    reason: StopReason
    rung: Rung
    returncode: int | None  # waitpid style: < 0 is a signal number; None if unknown

    @property
    def exitcode(self) -> int | None:
        return self.returncode if self.returncode is not None and self.returncode >= 0 else None

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


class WorkerInfo(msgspec.Struct, frozen=True):
    """A snapshot of one worker, as reported by ``Supervisor.stats()``."""

    tenant: str
    pid: int | None
    state: str  # a WorkerState value, e.g. "ready"
    rss: int | None  # bytes, last sample; None before the first sample
    requests: int  # calls completed (result or kernel error)
    in_flight: int
    started_at: float  # epoch seconds
    last_used: float  # epoch seconds of the last call start or completion
    stop_reason: str | None  # set once corral decided to stop it
    # The host pid of the process that runs the kernel: pid itself, except under
    # namespaces (strict()), where pid is corral's init and this is its child, the
    # kernel's pid 2. None until the worker is ready.
    kernel_pid: int | None = None
    version: str = ""  # the tenant policy's version label for the code it runs


class LayerStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """What one sandbox layer is doing for this supervisor's workers.

    ``state`` is ``"on"`` (applied to every worker; ``detail`` may say how, e.g.
    ``"ABI 4"``), ``"off"`` (not asked for) or ``"unavailable"`` (asked for, but this
    host cannot give it; ``detail`` says why). ``str()`` gives one line:
    ``"on (ABI 4)"``, ``"off"``, ``"unavailable: kernel without Landlock"``.
    """

    state: Literal["on", "off", "unavailable"]
    detail: str = ""

    @property
    def on(self) -> bool:
        return self.state == "on"

    def __str__(self) -> str:
        if self.state == "unavailable":
            return f"unavailable: {self.detail}"
        return f"{self.state} ({self.detail})" if self.detail else self.state


class SupervisorStats(msgspec.Struct, frozen=True):
    """A snapshot of the supervisor (``Supervisor.stats()``)."""

    state: str
    max_workers: int
    # Least recently used first; then any worker a reload replaced that is still
    # finishing its calls (state "draining" or "stopping"; its tenant is listed twice).
    workers: list[WorkerInfo]
    starts: int  # workers started (spawn requested)
    stops: dict[str, int]  # StopReason value -> count
    tenants_in_backoff: int
    # How a hard memory limit (worker_memory_hard_limit, or a tenant policy's) is
    # enforced here; "none" when neither the options nor a policy can set one.
    memory_enforcement: str
    memory_baseline: int | None  # bytes a fresh worker weighed at start (with limits set)
    memory_pressure: str | None  # what the pressure is, while it lasts
    sandbox: dict[str, LayerStatus]  # layer -> what it is doing (known after start)
    spares: list[int] = []  # pids of the spare workers ready to be taken (spare_workers)
