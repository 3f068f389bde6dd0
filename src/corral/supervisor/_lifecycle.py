"""Worker lifecycle: the states, the events, and the one function that moves
a handle from one state to the next.

``transition()`` writes ``handle.state`` (the handle writes out the warm call's two,
READY -> BUSY and BUSY -> READY, after checking the from-state). An unknown
(state, event) pair raises :class:`~corral.errors.InvariantError`: that is a
bug in corral, not a worker fault.

One deliberate difference from a plain "protocol violation -> DEAD": a worker
that misbehaves is still running, so it goes to STOPPING (at the kill rung)
and reaches DEAD only once it has been reaped. DEAD therefore always means
"the pid is gone".
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

from corral.errors import InvariantError

__all__ = [
    "Event",
    "Rung",
    "StopReason",
    "StopReport",
    "WorkerState",
    "transition",
]


class _FastEnum(enum.Enum):
    """Members hash by identity (they are singletons and compare by identity), in C:
    ``Enum.__hash__`` is Python code, and the transition table is hashed on every call."""

    __hash__ = object.__hash__


class WorkerState(_FastEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


SERVING = frozenset({WorkerState.READY, WorkerState.BUSY})  # states that take new calls


class Event(_FastEnum):
    HELLO_RECEIVED = "hello_received"
    START_FAILED = "start_failed"  # StartFailed message, or no Hello in time (process alive)
    CALL_SENT = "call_sent"  # first call in flight
    ALL_REPLIED = "all_replied"  # last call in flight completed
    EVICTED = "evicted"  # LRU, TTL, explicit evict, close
    DEADLINE_PASSED = "deadline_passed"  # a call or the drain ran out of time
    KILL_REQUESTED = "kill_requested"  # protocol violation, pipe closed, forced stop
    PROCESS_EXITED = "process_exited"


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
    PIPE_CLOSED = "pipe_closed"  # the worker closed its end of the pipe
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


S = WorkerState
E = Event
_LIVE = (S.STARTING, S.READY, S.BUSY, S.DRAINING, S.STOPPING)

_TABLE: dict[tuple[WorkerState, Event], WorkerState] = {
    (S.STARTING, E.HELLO_RECEIVED): S.READY,
    (S.STARTING, E.START_FAILED): S.STOPPING,
    (S.STARTING, E.EVICTED): S.STOPPING,
    (S.READY, E.CALL_SENT): S.BUSY,
    (S.READY, E.EVICTED): S.STOPPING,
    (S.BUSY, E.ALL_REPLIED): S.READY,
    (S.BUSY, E.EVICTED): S.DRAINING,
    (S.BUSY, E.DEADLINE_PASSED): S.STOPPING,
    (S.DRAINING, E.ALL_REPLIED): S.STOPPING,
    (S.DRAINING, E.DEADLINE_PASSED): S.STOPPING,
    **{(state, E.KILL_REQUESTED): S.STOPPING for state in _LIVE},
    **{(state, E.PROCESS_EXITED): S.DEAD for state in _LIVE},
}


class _HasState(Protocol):
    state: WorkerState


def transition(handle: _HasState, event: Event) -> WorkerState:
    """Apply ``event`` to ``handle.state`` and return the new state.

    Raises:
        InvariantError: the event is not allowed in the current state.
    """
    try:
        new = _TABLE[(handle.state, event)]
    except KeyError:
        raise InvariantError(f"no transition from {handle.state.name} on {event.name}") from None
    handle.state = new
    return new
