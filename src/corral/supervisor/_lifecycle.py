"""Worker lifecycle: the states, the events, the one function that moves a handle from
one state to the next, and the one record of how a worker ends.

``transition()`` writes ``handle.state``. The handle writes out the warm call's two,
READY -> BUSY (:data:`WARM_SEND`) and BUSY -> READY (:data:`WARM_REPLY`), after
checking the from-state; a test ties them to this table. An unknown (state, event)
pair raises :class:`~corral.errors.InvariantError`: that is a bug in corral, not a
worker fault.

:class:`Ending` is everything about a worker's stop: the reason (the first one
decided wins; the OS's out-of-memory kill overrides a soft-limit recycle), how far
termination went (the rung only climbs), what the worker did wrong, the error its
start waiters get, and at the end the :class:`StopReport`. The handle writes it only
through its methods.

One deliberate difference from a plain "protocol violation -> DEAD": a worker
that misbehaves is still running, so it goes to STOPPING (at the kill rung)
and reaches DEAD only once it has been reaped. DEAD therefore always means
"the pid is gone".
"""

from __future__ import annotations

import enum
import signal
from typing import Protocol

from corral.errors import InvariantError, StartError
from corral.supervisor.records import Rung, StopReason, StopReport, WorkerState

__all__ = [
    "SERVING",
    "WARM_REPLY",
    "WARM_SEND",
    "Ending",
    "Event",
    "transition",
]

S = WorkerState

SERVING = frozenset({S.READY, S.BUSY})  # states that take new calls


class Event(enum.Enum):
    __hash__ = object.__hash__  # (as WorkerState: hashed by identity, in C)

    HELLO_RECEIVED = "hello_received"
    START_FAILED = "start_failed"  # StartFailed message, or no Hello in time (process alive)
    CALL_SENT = "call_sent"  # first call in flight
    ALL_REPLIED = "all_replied"  # last call in flight completed
    EVICTED = "evicted"  # LRU, TTL, memory, explicit evict, close
    DRAIN_TIMED_OUT = "drain_timed_out"  # an evicted busy worker's calls ran past drain_timeout
    KILL_REQUESTED = "kill_requested"  # protocol violation, pipe closed, call timeout
    PROCESS_EXITED = "process_exited"


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
    (S.DRAINING, E.ALL_REPLIED): S.STOPPING,
    (S.DRAINING, E.DRAIN_TIMED_OUT): S.STOPPING,
    **{(state, E.KILL_REQUESTED): S.STOPPING for state in _LIVE},
    **{(state, E.PROCESS_EXITED): S.DEAD for state in _LIVE},
}

# The warm path's transitions, which the handle spells out (from-state, event, to-state).
WARM_SEND = (S.READY, E.CALL_SENT, S.BUSY)
WARM_REPLY = (S.BUSY, E.ALL_REPLIED, S.READY)


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


_RUNG_ORDER = {Rung.NONE: 0, Rung.ASK: 1, Rung.TERM: 2, Rung.KILL: 3}


class Ending:
    """How one worker ends: written through these methods only, read by anyone.

    Attributes:
        reason: why corral stopped it, once decided (None: nobody asked, so far).
        rung: the furthest termination step taken.
        pipe_closed: its pipe closed while it was not stopping, and corral killed it.
        detail: what it did wrong, in corral's words (for a protocol error).
        start_error: the error its start waiters get, if its start failed as such.
        kill_unanswered: SIGKILLed ``kill_timeout`` ago and still not reaped.
        report: how it ended, once reaped.
    """

    __slots__ = (
        "detail",
        "kill_unanswered",
        "pipe_closed",
        "reason",
        "report",
        "rung",
        "start_error",
    )

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.rung = Rung.NONE
        self.pipe_closed = False
        self.detail = ""
        self.start_error: StartError | None = None
        self.kill_unanswered = False
        self.report: StopReport | None = None

    def decide(self, reason: StopReason) -> None:
        """Record why it stops: the first reason decided is the one reported."""
        if self.reason is None:
            self.reason = reason

    def climb(self, rung: Rung) -> None:
        """Termination reached ``rung`` (never lowers it)."""
        if _RUNG_ORDER[rung] > _RUNG_ORDER[self.rung]:
            self.rung = rung

    def start_failed(self, reason: StopReason, error: StartError | None) -> None:
        """Its start failed: ``error`` (None: to be said once it is reaped) for waiters."""
        self.decide(reason)
        self.start_error = error

    def lost_pipe(self) -> None:
        """Its pipe closed while it was serving or starting; corral kills it."""
        self.pipe_closed = True
        self.start_error = None  # whatever it printed is better said once it is reaped

    def misbehaved(self, detail: str) -> None:
        self.detail = detail

    def kill_went_unanswered(self) -> None:
        """SIGKILLed ``kill_timeout`` ago and still not reaped: nothing more corral can do."""
        self.kill_unanswered = True

    def close(self, returncode: int | None, oom_killed: bool) -> StopReport:
        """It was reaped (``returncode`` waitpid style; None: its warden died first).
        Settles the reason and the rung, and returns the report."""
        reason, rung = self.reason, self.rung
        if oom_killed and reason in (None, StopReason.MEMORY_LIMIT):
            reason, rung = StopReason.MEMORY_HARD_LIMIT, Rung.NONE  # the OS stopped it
        elif reason is None and returncode is None:
            reason = StopReason.WARDEN_DIED  # no exit status: its warden died
        elif reason is None and self.pipe_closed and returncode == -signal.SIGKILL:
            reason = StopReason.PIPE_CLOSED  # corral's kill after its EOF ended it
        if reason is None:
            reason = StopReason.CRASHED
            rung = Rung.NONE  # it went by itself
        self.reason, self.rung = reason, rung
        self.report = StopReport(reason=reason, rung=rung, returncode=returncode)
        return self.report
