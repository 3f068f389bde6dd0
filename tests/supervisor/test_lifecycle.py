"""The worker state machine: every allowed transition, and every other one refused."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass

import pytest

from corral.errors import CorralError, InvariantError
from corral.supervisor._lifecycle import (
    Event,
    Rung,
    StopReason,
    StopReport,
    WorkerState,
    transition,
)

S = WorkerState
E = Event
LIVE = [S.STARTING, S.READY, S.BUSY, S.DRAINING, S.STOPPING]

# Written out independently of the module's table: this is the specification.
ALLOWED: dict[tuple[WorkerState, Event], WorkerState] = {
    (S.STARTING, E.HELLO_RECEIVED): S.READY,
    (S.STARTING, E.START_FAILED): S.STOPPING,
    (S.STARTING, E.EVICTED): S.STOPPING,
    (S.STARTING, E.KILL_REQUESTED): S.STOPPING,
    (S.STARTING, E.PROCESS_EXITED): S.DEAD,
    (S.READY, E.CALL_SENT): S.BUSY,
    (S.READY, E.EVICTED): S.STOPPING,
    (S.READY, E.KILL_REQUESTED): S.STOPPING,
    (S.READY, E.PROCESS_EXITED): S.DEAD,
    (S.BUSY, E.ALL_REPLIED): S.READY,
    (S.BUSY, E.EVICTED): S.DRAINING,
    (S.BUSY, E.DEADLINE_PASSED): S.STOPPING,
    (S.BUSY, E.KILL_REQUESTED): S.STOPPING,
    (S.BUSY, E.PROCESS_EXITED): S.DEAD,
    (S.DRAINING, E.ALL_REPLIED): S.STOPPING,
    (S.DRAINING, E.DEADLINE_PASSED): S.STOPPING,
    (S.DRAINING, E.KILL_REQUESTED): S.STOPPING,
    (S.DRAINING, E.PROCESS_EXITED): S.DEAD,
    (S.STOPPING, E.KILL_REQUESTED): S.STOPPING,
    (S.STOPPING, E.PROCESS_EXITED): S.DEAD,
}
DISALLOWED = [pair for pair in itertools.product(S, E) if pair not in ALLOWED]


@dataclass
class FakeHandle:
    state: WorkerState


def params(pairs: list[tuple[WorkerState, Event]]) -> list[object]:
    return [pytest.param(state, event, id=f"{state.name}-{event.name}") for state, event in pairs]


@pytest.mark.parametrize(("start", "event"), params(list(ALLOWED)))
def test_allowed_transition(start: WorkerState, event: Event) -> None:
    handle = FakeHandle(start)
    new = transition(handle, event)
    assert new is ALLOWED[(start, event)]
    assert handle.state is new


@pytest.mark.parametrize(("start", "event"), params(DISALLOWED))
def test_disallowed_transition_raises_and_leaves_the_state(
    start: WorkerState, event: Event
) -> None:
    handle = FakeHandle(start)
    with pytest.raises(InvariantError, match=f"no transition from {start.name} on {event.name}"):
        transition(handle, event)
    assert handle.state is start


def test_the_specification_covers_every_pair() -> None:
    assert len(ALLOWED) + len(DISALLOWED) == len(S) * len(E)
    assert len(DISALLOWED) == 28


def test_dead_is_final() -> None:
    handle = FakeHandle(S.DEAD)
    for event in E:
        with pytest.raises(InvariantError):
            transition(handle, event)
    assert handle.state is S.DEAD


def test_invariant_error_is_a_corral_error() -> None:
    with pytest.raises(CorralError):
        transition(FakeHandle(S.READY), E.HELLO_RECEIVED)


@pytest.mark.parametrize(
    ("events", "states"),
    [
        (  # the happy path, then an idle eviction
            [E.HELLO_RECEIVED, E.CALL_SENT, E.ALL_REPLIED, E.EVICTED, E.PROCESS_EXITED],
            [S.READY, S.BUSY, S.READY, S.STOPPING, S.DEAD],
        ),
        (  # evicted while busy: drain, then stop
            [E.HELLO_RECEIVED, E.CALL_SENT, E.EVICTED, E.ALL_REPLIED, E.PROCESS_EXITED],
            [S.READY, S.BUSY, S.DRAINING, S.STOPPING, S.DEAD],
        ),
        (  # a call timed out, then the worker had to be killed
            [E.HELLO_RECEIVED, E.CALL_SENT, E.DEADLINE_PASSED, E.KILL_REQUESTED, E.PROCESS_EXITED],
            [S.READY, S.BUSY, S.STOPPING, S.STOPPING, S.DEAD],
        ),
        ([E.START_FAILED, E.PROCESS_EXITED], [S.STOPPING, S.DEAD]),
        ([E.HELLO_RECEIVED, E.CALL_SENT, E.PROCESS_EXITED], [S.READY, S.BUSY, S.DEAD]),
    ],
    ids=["idle-evict", "drain", "timeout-kill", "start-failed", "crash"],
)
def test_paths_through_the_machine(events: list[Event], states: list[WorkerState]) -> None:
    handle = FakeHandle(S.STARTING)
    seen = [transition(handle, event) for event in events]
    assert seen == states
    assert handle.state is states[-1]


# --- StopReport ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "exitcode", "signum"),
    [
        (0, 0, None),
        (3, 3, None),
        (255, 255, None),
        (-int(signal.SIGKILL), None, int(signal.SIGKILL)),
        (-int(signal.SIGSEGV), None, int(signal.SIGSEGV)),
        (-1, None, 1),
        (None, None, None),
    ],
)
def test_stop_report_splits_the_return_code(
    returncode: int | None, exitcode: int | None, signum: int | None
) -> None:
    report = StopReport(reason=StopReason.CRASHED, rung=Rung.NONE, returncode=returncode)
    assert report.exitcode == exitcode
    assert report.signal == signum


def test_stop_report_is_a_frozen_value() -> None:
    report = StopReport(reason=StopReason.LRU, rung=Rung.ASK, returncode=0)
    assert report == StopReport(StopReason.LRU, Rung.ASK, 0)
    assert report != StopReport(StopReason.LRU, Rung.TERM, 0)
    with pytest.raises(AttributeError):
        report.returncode = 1  # type: ignore[misc]
    assert report.returncode == 0
