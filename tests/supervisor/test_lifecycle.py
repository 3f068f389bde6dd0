"""The worker state machine: every allowed transition, and every other one refused."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass

import pytest

from corral.errors import CorralError, InvariantError
from corral.supervisor._lifecycle import WARM_REPLY, WARM_SEND, Ending, Event, transition
from corral.supervisor.records import Rung, StopReason, StopReport, WorkerState

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
    (S.BUSY, E.KILL_REQUESTED): S.STOPPING,
    (S.BUSY, E.PROCESS_EXITED): S.DEAD,
    (S.DRAINING, E.ALL_REPLIED): S.STOPPING,
    (S.DRAINING, E.DRAIN_TIMED_OUT): S.STOPPING,
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
    assert len(DISALLOWED) == 29


@pytest.mark.parametrize("spelled_out", [WARM_SEND, WARM_REPLY], ids=["send", "reply"])
def test_the_warm_path_transitions_the_handle_spells_out_are_the_tables(
    spelled_out: tuple[WorkerState, Event, WorkerState],
) -> None:
    start, event, end = spelled_out
    assert ALLOWED[(start, event)] is end
    assert transition(FakeHandle(start), event) is end


def test_the_handle_spells_out_exactly_the_warm_transitions() -> None:
    """Every write of ``state`` in the handle outside transition() is one of the two warm
    ones, from the state it names: read from the handle's source."""
    import inspect
    import re

    from corral.supervisor import _handle

    source = inspect.getsource(_handle)
    writes = re.findall(r"self\.state = S\.(\w+)", source)
    assert writes[0] == "STARTING", writes  # the initial state, in __init__
    writes = writes[1:]
    assert sorted(writes) == sorted([WARM_SEND[2].name, WARM_REPLY[2].name]), writes
    for start, _event, end in (WARM_SEND, WARM_REPLY):
        guard = re.search(
            rf"if self\.state is S\.{start.name}:\n\s+self\.state = S\.{end.name}", source
        )
        assert guard is not None, f"{start.name} -> {end.name} is not guarded by its from-state"


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
        (  # a call timed out: killed (and SIGKILLed again while stopping)
            [E.HELLO_RECEIVED, E.CALL_SENT, E.KILL_REQUESTED, E.KILL_REQUESTED, E.PROCESS_EXITED],
            [S.READY, S.BUSY, S.STOPPING, S.STOPPING, S.DEAD],
        ),
        (  # evicted while busy, and its calls outlived drain_timeout
            [E.HELLO_RECEIVED, E.CALL_SENT, E.EVICTED, E.DRAIN_TIMED_OUT, E.PROCESS_EXITED],
            [S.READY, S.BUSY, S.DRAINING, S.STOPPING, S.DEAD],
        ),
        ([E.START_FAILED, E.PROCESS_EXITED], [S.STOPPING, S.DEAD]),
        ([E.HELLO_RECEIVED, E.CALL_SENT, E.PROCESS_EXITED], [S.READY, S.BUSY, S.DEAD]),
    ],
    ids=["idle-evict", "drain", "timeout-kill", "drain-timeout", "start-failed", "crash"],
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


# --- Ending: the one record of a stop -----------------------------------------------------------

KILLED = -int(signal.SIGKILL)


def test_the_first_reason_decided_is_reported() -> None:
    ending = Ending()
    ending.decide(StopReason.CALL_TIMEOUT)
    ending.decide(StopReason.CLOSED)
    ending.climb(Rung.KILL)
    assert ending.close(KILLED, oom_killed=False) == StopReport(
        StopReason.CALL_TIMEOUT, Rung.KILL, KILLED
    )


def test_the_rung_only_climbs() -> None:
    ending = Ending()
    for rung in (Rung.TERM, Rung.ASK, Rung.NONE):
        ending.climb(rung)
    assert ending.rung is Rung.TERM
    ending.climb(Rung.KILL)
    assert ending.rung is Rung.KILL


@pytest.mark.parametrize(
    ("decided", "pipe_closed", "returncode", "oom", "reason", "rung"),
    [
        # nobody asked, it exited or was killed from outside: a crash, no rung of ours
        (None, False, 3, False, StopReason.CRASHED, Rung.NONE),
        (None, False, KILLED, False, StopReason.CRASHED, Rung.NONE),
        # its pipe closed, corral's SIGKILL ended it; or it exited first by itself
        (None, True, KILLED, False, StopReason.PIPE_CLOSED, Rung.KILL),
        (None, True, 1, False, StopReason.CRASHED, Rung.NONE),
        # no exit status: its warden died
        (None, False, None, False, StopReason.WARDEN_DIED, Rung.KILL),
        # the OS's out-of-memory kill overrides a soft-limit recycle, not a timeout
        (StopReason.MEMORY_LIMIT, False, KILLED, True, StopReason.MEMORY_HARD_LIMIT, Rung.NONE),
        (None, False, KILLED, True, StopReason.MEMORY_HARD_LIMIT, Rung.NONE),
        (StopReason.CALL_TIMEOUT, False, KILLED, True, StopReason.CALL_TIMEOUT, Rung.KILL),
        # a decided stop keeps its reason and its rung
        (StopReason.LRU, False, 0, False, StopReason.LRU, Rung.KILL),
    ],
)
def test_close_settles_the_reason_and_the_rung(
    decided: StopReason | None,
    pipe_closed: bool,
    returncode: int | None,
    oom: bool,
    reason: StopReason,
    rung: Rung,
) -> None:
    ending = Ending()
    if decided is not None:
        ending.decide(decided)
    if pipe_closed:
        ending.lost_pipe()
    ending.climb(Rung.KILL)
    report = ending.close(returncode, oom_killed=oom)
    assert report == StopReport(reason, rung, returncode)
    assert ending.report is report and ending.reason is reason and ending.rung is rung
