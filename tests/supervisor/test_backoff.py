"""Restart intensity and exponential backoff on a fake clock; describe_exit wording."""

from __future__ import annotations

import signal

import pytest

from corral.supervisor._backoff import BackoffPolicy, RestartTracker
from corral.supervisor._outcomes import describe_exit
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def tracker(
    clock: FakeClock,
    intensity: int = 2,
    period: float = 60.0,
    base: float = 1.0,
    cap: float = 60.0,
) -> RestartTracker:
    return RestartTracker(BackoffPolicy(intensity, period, base, cap), clock)


def open_backoff(restarts: RestartTracker, tenant: str, intensity: int) -> float | None:
    """Fail ``intensity + 1`` times at the current time; return the last result."""
    results = [restarts.record_failure(tenant, f"crash {i}") for i in range(intensity + 1)]
    assert results[:-1] == [None] * intensity
    return results[-1]


# --- BackoffPolicy -------------------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = BackoffPolicy()
    assert (policy.intensity, policy.period, policy.base, policy.cap) == (5, 60.0, 1.0, 60.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"intensity": -1}, "restart_intensity must be >= 0"),
        ({"period": 0}, "restart_period and backoff times must be positive"),
        ({"period": -5}, "restart_period and backoff times must be positive"),
        ({"base": 0}, "restart_period and backoff times must be positive"),
        ({"base": -1, "cap": 1}, "restart_period and backoff times must be positive"),
        ({"base": 2, "cap": 1}, "cap >= base"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_edge_values_are_allowed() -> None:
    policy = BackoffPolicy(intensity=0, period=0.001, base=5.0, cap=5.0)
    assert (policy.intensity, policy.cap) == (0, 5.0)


# --- intensity within the period -----------------------------------------------------------------


def test_no_backoff_until_more_than_intensity_failures(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=3)
    for _ in range(3):
        assert restarts.record_failure("t", "crashed") is None
        clock.advance(1)
    assert restarts.retry_after("t") is None
    assert restarts.in_backoff() == 0
    assert restarts.record_failure("t", "crashed") == 1.0
    assert restarts.in_backoff() == 1


def test_zero_intensity_backs_off_on_the_first_failure(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0, base=2.5, cap=10.0)
    assert restarts.record_failure("t", "boom") == 2.5
    assert restarts.retry_after("t") == (2.5, 1, "boom")


def test_failures_older_than_the_period_do_not_count(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=1, period=10.0)
    assert restarts.record_failure("t", "a") is None  # t=500
    clock.advance(10.0)
    assert restarts.record_failure("t", "b") is None  # t=510: the first is exactly a period old
    clock.advance(9.9)
    assert restarts.record_failure("t", "c") == 1.0  # t=519.9: 510 and 519.9 are within 10 s


def test_failures_are_counted_per_tenant(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=1)
    assert restarts.record_failure("a", "x") is None
    assert restarts.record_failure("b", "x") is None
    assert restarts.record_failure("a", "x") == 1.0
    assert restarts.retry_after("a") is not None
    assert restarts.retry_after("b") is None
    assert len(restarts) == 2


# --- the backoff itself --------------------------------------------------------------------------


def test_retry_after_counts_down_and_ends(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0, base=4.0)
    assert restarts.record_failure("t", "exited with code 3") == 4.0
    assert restarts.retry_after("t") == (4.0, 1, "exited with code 3")
    clock.advance(1.5)
    assert restarts.retry_after("t") == (2.5, 1, "exited with code 3")
    clock.advance(2.5)
    assert restarts.retry_after("t") is None
    assert restarts.in_backoff() == 0


def test_retry_after_of_an_unknown_tenant_is_none(clock: FakeClock) -> None:
    restarts = tracker(clock)
    assert restarts.retry_after("nobody") is None


def test_delay_doubles_per_consecutive_backoff_and_is_capped(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=1, base=1.0, cap=10.0)
    delays = []
    levels = []
    for _ in range(6):
        delay = open_backoff(restarts, "t", intensity=1)
        assert delay is not None
        delays.append(delay)
        left = restarts.retry_after("t")
        assert left is not None
        levels.append(left[1])
        clock.advance(delay)  # wait the backoff out, then fail again at once
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert levels == [1, 2, 3, 4, 5, 6]


def test_opening_backoff_starts_a_new_count(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=2)
    assert open_backoff(restarts, "t", intensity=2) == 1.0
    clock.advance(1.0)
    # The failures that opened the backoff are not counted again.
    assert restarts.record_failure("t", "x") is None
    assert restarts.record_failure("t", "x") is None
    assert restarts.record_failure("t", "x") == 2.0


def test_last_error_is_the_most_recent_description(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=1)
    restarts.record_failure("t", "first")
    restarts.record_failure("t", "second")
    assert restarts.retry_after("t") == (1.0, 1, "second")


def test_in_backoff_counts_only_tenants_refused_now(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0, base=1.0, cap=60.0)
    restarts.record_failure("a", "x")  # until 501
    clock.advance(0.5)
    restarts.record_failure("b", "x")  # until 501.5
    assert restarts.in_backoff() == 2
    clock.advance(0.5)
    assert restarts.in_backoff() == 1
    clock.advance(0.5)
    assert restarts.in_backoff() == 0


# --- forgetting ----------------------------------------------------------------------------------


def test_record_success_forgets_the_tenant(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0)
    assert restarts.record_failure("t", "x") == 1.0
    clock.advance(1.0)
    assert restarts.record_failure("t", "x") == 2.0
    restarts.record_success("t")
    assert len(restarts) == 0
    assert restarts.retry_after("t") is None
    assert restarts.record_failure("t", "x") == 1.0  # back to the base delay


def test_record_success_of_an_unknown_tenant_is_harmless(clock: FakeClock) -> None:
    restarts = tracker(clock)
    restarts.record_success("t")
    restarts.record_failure("a", "x")
    restarts.record_success("t")
    assert len(restarts) == 1


def test_record_success_during_backoff_lifts_it(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0)
    restarts.record_failure("t", "x")
    restarts.record_success("t")
    assert restarts.retry_after("t") is None
    assert restarts.in_backoff() == 0


def test_prune_forgets_stale_tenants_only(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=3, period=10.0, base=100.0, cap=100.0)
    restarts.record_failure("stale", "x")  # t=500
    clock.advance(5)
    restarts.record_failure("recent", "x")  # t=505
    open_backoff(restarts, "backing-off", intensity=3)  # t=505, until 605
    clock.advance(5)  # t=510: "stale" failed exactly a period ago
    restarts.prune()
    assert len(restarts) == 2
    assert restarts.retry_after("backing-off") is not None
    clock.advance(5)  # t=515: "recent" is now stale too
    restarts.prune()
    assert len(restarts) == 1
    assert restarts.retry_after("backing-off") is not None
    clock.advance(90)  # t=605: backoff over, and its failures are a period old
    restarts.prune()
    assert len(restarts) == 0


def test_a_pruned_tenant_starts_again_from_the_base_delay(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0, period=10.0)
    assert restarts.record_failure("t", "x") == 1.0
    clock.advance(10.0)
    restarts.prune()
    assert len(restarts) == 0
    assert restarts.record_failure("t", "x") == 1.0


def test_prune_keeps_a_tenant_with_a_failure_within_the_period(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=2, period=10.0)
    restarts.record_failure("t", "x")
    clock.advance(9.9)
    restarts.prune()
    assert len(restarts) == 1
    assert restarts.record_failure("t", "x") is None
    assert restarts.record_failure("t", "x") == 1.0  # the first failure still counts


def test_prune_right_after_a_backoff_keeps_the_level(clock: FakeClock) -> None:
    restarts = tracker(clock, intensity=0, period=60.0)
    assert restarts.record_failure("t", "x") == 1.0  # t=500
    clock.advance(2.0)  # backoff over; last failure 2 s ago, well within the period
    restarts.prune()
    assert len(restarts) == 1
    assert restarts.record_failure("t", "x") == 2.0


# --- describe_exit -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (None, "exit status unknown"),
        (0, "exited with code 0"),
        (1, "exited with code 1"),
        (3, "exited with code 3"),
        (255, "exited with code 255"),
        (-signal.SIGKILL, "killed by SIGKILL (out of memory, or killed from outside?)"),
        (-signal.SIGSEGV, "killed by SIGSEGV (segmentation fault in native code?)"),
        (-signal.SIGABRT, "killed by SIGABRT (abort() in native code?)"),
        (-signal.SIGBUS, "killed by SIGBUS (bus error in native code?)"),
        (-signal.SIGXCPU, "killed by SIGXCPU (CPU time limit reached?)"),
        (-signal.SIGTERM, "killed by SIGTERM (terminated from outside?)"),
        (-signal.SIGINT, "killed by SIGINT"),
        (-signal.SIGHUP, "killed by SIGHUP"),
        (-1000, "killed by signal 1000"),
    ],
    ids=repr,
)
def test_describe_exit(returncode: int | None, text: str) -> None:
    assert describe_exit(None if returncode is None else int(returncode)) == text
