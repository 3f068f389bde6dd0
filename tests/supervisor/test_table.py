"""WorkerTable on a fake clock: LRU order, idle order, TTL expiry and capacity."""

from __future__ import annotations

import pytest

from corral.supervisor._table import TableStatistics, WorkerTable
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def make_table(
    clock: FakeClock, *tenants: str, max_workers: int = 4, idle_ttl: float | None = 10.0
) -> WorkerTable[str]:
    table: WorkerTable[str] = WorkerTable(max_workers, idle_ttl, clock)
    for tenant in tenants:
        table.add(tenant, f"handle-{tenant}")
    return table


def stats(entries: int, idle: int, max_workers: int = 4) -> TableStatistics:
    return TableStatistics(entries=entries, idle=idle, max_workers=max_workers)


# --- entries and LRU order -----------------------------------------------------------------------


def test_empty_table(clock: FakeClock) -> None:
    table = make_table(clock)
    assert len(table) == 0
    assert table.keys() == []
    assert table.handles() == []
    assert table.lru_victim() is None
    assert table.expired() == []
    assert table.next_expiry() is None
    assert table.has_room()
    assert table.statistics() == stats(0, 0)


def test_add_appends_as_most_recently_used_and_not_idle(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    assert table.keys() == ["a", "b", "c"]
    assert table.handles() == ["handle-a", "handle-b", "handle-c"]
    assert len(table) == 3
    assert "b" in table
    assert "z" not in table
    assert not table.is_idle("a")
    assert table.lru_victim() is None
    assert table.statistics() == stats(3, 0)


def test_get_returns_the_handle_and_marks_it_most_recently_used(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    assert table.get("a") == "handle-a"
    assert table.keys() == ["b", "c", "a"]
    assert table.get("c") == "handle-c"
    assert table.keys() == ["b", "a", "c"]
    assert table.handles() == ["handle-b", "handle-a", "handle-c"]


def test_get_of_an_unknown_tenant_is_none_and_changes_nothing(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b")
    assert table.get("zz") is None
    assert table.keys() == ["a", "b"]
    assert table.statistics() == stats(2, 0)


def test_peek_does_not_touch(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    assert table.peek("a") == "handle-a"
    assert table.peek("zz") is None
    assert table.keys() == ["a", "b", "c"]


def test_touch_marks_most_recently_used(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    table.touch("a")
    assert table.keys() == ["b", "c", "a"]
    assert table.handles() == ["handle-b", "handle-c", "handle-a"]
    table.touch("a")  # already the most recent
    assert table.keys() == ["b", "c", "a"]
    table.touch("ghost")  # not there: nothing changes, nothing is added
    assert table.keys() == ["b", "c", "a"]
    assert table.statistics() == stats(3, 0)


def test_touch_does_not_make_idle_or_busy(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b")
    table.mark_idle("a")
    clock.advance(1)
    table.mark_idle("b")
    table.touch("a")
    assert table.is_idle("a") and table.is_idle("b")
    assert table.lru_victim() == "a"  # the victim follows the idle order, not the touch
    assert table.next_expiry() == 1010.0


def test_mark_idle_does_not_touch_the_lru_order(clock: FakeClock) -> None:
    """The idle mark comes one loop iteration after a call's last reply; by then its
    caller may have called another tenant, which must stay the most recent."""
    table = make_table(clock, "a", "b", "c")
    table.mark_idle("a")
    assert table.keys() == ["a", "b", "c"]
    assert table.is_idle("a")


def _call(table: WorkerTable[str], tenant: str) -> None:
    """What the supervisor does to the table for one call that completes: the touch
    when it starts (get) and when its reply arrives (touch); busy while in flight."""
    assert table.get(tenant) is not None
    table.mark_busy(tenant)
    table.touch(tenant)


def test_order_after_a_b_a_with_the_idle_marks_one_iteration_late(clock: FakeClock) -> None:
    """Issue 14.1: ``a, b, a`` then ``keys()`` is ``[b, a]`` at once, although each idle
    mark lands after the next call has started (as the supervisor defers it)."""
    table = make_table(clock, "a", "b")
    _call(table, "a")
    assert table.keys() == ["b", "a"]
    _call(table, "b")
    table.mark_idle("a")  # a's deferred idle mark, after b's call began
    assert table.keys() == ["a", "b"]
    clock.advance(1)
    _call(table, "a")
    table.mark_idle("b")  # b's deferred idle mark, after a's call began
    assert table.keys() == ["b", "a"]
    assert table.handles() == ["handle-b", "handle-a"]
    table.mark_idle("a")
    assert table.keys() == ["b", "a"]
    assert table.lru_victim() == "b"  # idle longest
    assert table.statistics() == stats(2, 2)


def test_order_of_overlapping_calls_follows_their_starts_and_completions(
    clock: FakeClock,
) -> None:
    table = make_table(clock, "a", "b", "c")
    table.get("a")  # a long call to a starts
    table.mark_busy("a")
    _call(table, "b")  # a call to b starts and completes meanwhile
    assert table.keys() == ["c", "a", "b"]
    table.touch("a")  # a's reply
    assert table.keys() == ["c", "b", "a"]
    table.mark_idle("b")
    table.mark_idle("a")
    assert table.keys() == ["c", "b", "a"]


def test_order_after_remove_keeps_the_others_in_place(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    _call(table, "a")
    table.remove("b")
    assert table.keys() == ["c", "a"]
    table.add("b", "handle-b2")
    assert table.keys() == ["c", "a", "b"]


# --- idle order and the LRU victim ---------------------------------------------------------------


def test_lru_victim_is_the_longest_idle(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c")
    table.mark_idle("b")
    clock.advance(1)
    table.mark_idle("a")
    clock.advance(1)
    table.mark_idle("c")
    assert table.lru_victim() == "b"
    assert table.statistics() == stats(3, 3)


def test_becoming_idle_again_moves_to_the_back_of_the_idle_order(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b")
    table.mark_idle("a")
    clock.advance(1)
    table.mark_idle("b")
    clock.advance(1)
    table.mark_busy("a")
    table.mark_idle("a")  # a call started and completed
    assert table.lru_victim() == "b"
    table.mark_idle("b")  # idempotent refresh also counts as newer
    assert table.lru_victim() == "a"


def test_mark_busy_removes_from_idle(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b")
    table.mark_idle("a")
    table.mark_idle("b")
    table.mark_busy("a")
    assert not table.is_idle("a")
    assert table.is_idle("b")
    assert table.idle_count() == 1
    assert table.lru_victim() == "b"
    assert table.keys() == ["a", "b"]  # busy does not touch the LRU order
    assert table.statistics() == stats(2, 1)
    table.mark_busy("b")
    assert table.lru_victim() is None
    assert table.statistics() == stats(2, 0)


def test_mark_busy_of_a_tenant_that_is_not_idle_is_harmless(clock: FakeClock) -> None:
    table = make_table(clock, "a")
    table.mark_busy("a")
    table.mark_busy("unknown")
    assert table.statistics() == stats(1, 0)


def test_mark_idle_of_an_unknown_tenant_is_ignored(clock: FakeClock) -> None:
    table = make_table(clock, "a")
    table.mark_idle("ghost")
    assert not table.is_idle("ghost")
    assert "ghost" not in table
    assert table.lru_victim() is None
    assert table.statistics() == stats(1, 0)


# --- TTL -----------------------------------------------------------------------------------------


def test_expired_oldest_first_and_inclusive_at_the_ttl(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", "c", idle_ttl=10.0)
    table.mark_idle("c")  # t=1000
    clock.advance(3)
    table.mark_idle("a")  # t=1003
    clock.advance(3)
    table.mark_idle("b")  # t=1006
    assert table.next_expiry() == 1010.0

    clock.now = 1009.999
    assert table.expired() == []
    clock.now = 1010.0
    assert table.expired() == ["c"]
    clock.now = 1013.5
    assert table.expired() == ["c", "a"]
    clock.now = 1100.0
    assert table.expired() == ["c", "a", "b"]


def test_expired_does_not_change_the_table(clock: FakeClock) -> None:
    table = make_table(clock, "a", idle_ttl=1.0)
    table.mark_idle("a")
    clock.advance(5)
    assert table.expired() == ["a"]
    assert table.expired() == ["a"]
    assert table.is_idle("a")
    assert table.statistics() == stats(1, 1)


def test_busy_tenants_never_expire(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", idle_ttl=10.0)
    table.mark_idle("a")
    table.mark_idle("b")
    table.mark_busy("a")
    clock.advance(1000)
    assert table.expired() == ["b"]


def test_idle_time_restarts_when_the_tenant_is_idle_again(clock: FakeClock) -> None:
    table = make_table(clock, "a", idle_ttl=10.0)
    table.mark_idle("a")
    clock.advance(8)
    table.mark_busy("a")
    clock.advance(100)  # a long call: idle is timed from its completion
    table.mark_idle("a")
    assert table.expired() == []
    assert table.next_expiry() == clock.now + 10.0
    clock.advance(10)
    assert table.expired() == ["a"]


def test_next_expiry_follows_the_oldest_idle_entry(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", idle_ttl=5.0)
    assert table.next_expiry() is None
    table.mark_idle("a")  # 1000
    clock.advance(2)
    table.mark_idle("b")  # 1002
    assert table.next_expiry() == 1005.0
    table.mark_busy("a")
    assert table.next_expiry() == 1007.0
    table.remove("b")
    assert table.next_expiry() is None


def test_no_ttl_never_expires(clock: FakeClock) -> None:
    table = make_table(clock, "a", idle_ttl=None)
    table.mark_idle("a")
    clock.advance(1e9)
    assert table.expired() == []
    assert table.next_expiry() is None
    assert table.lru_victim() == "a"  # still an LRU candidate


def test_zero_ttl_expires_as_soon_as_idle(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", idle_ttl=0)
    assert table.expired() == []
    table.mark_idle("a")
    assert table.expired() == ["a"]
    assert table.next_expiry() == clock.now
    table.mark_idle("b")
    assert table.expired() == ["a", "b"]


# --- capacity, add, remove -----------------------------------------------------------------------


def test_has_room_until_max_workers(clock: FakeClock) -> None:
    table = make_table(clock, max_workers=2)
    assert table.has_room()
    table.add("a", "handle-a")
    assert table.has_room()
    table.add("b", "handle-b")
    assert not table.has_room()
    assert table.statistics() == stats(2, 0, max_workers=2)


def test_add_to_a_full_table_is_an_overflow_error(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", max_workers=2)
    with pytest.raises(OverflowError, match="full"):
        table.add("c", "handle-c")
    assert table.keys() == ["a", "b"]
    assert table.statistics() == stats(2, 0, max_workers=2)


@pytest.mark.parametrize("max_workers", [1, 2])
def test_adding_a_tenant_twice_is_a_key_error(clock: FakeClock, max_workers: int) -> None:
    table = make_table(clock, "a", max_workers=max_workers)
    with pytest.raises(KeyError, match="'a' already has an entry"):
        table.add("a", "other-handle")
    assert table.peek("a") == "handle-a"
    assert table.statistics() == stats(1, 0, max_workers=max_workers)


def test_idle_entries_still_take_room(clock: FakeClock) -> None:
    table = make_table(clock, "a", max_workers=1)
    table.mark_idle("a")
    assert not table.has_room()
    assert table.lru_victim() == "a"


def test_remove_returns_the_handle_and_frees_room(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b", max_workers=2)
    table.mark_idle("a")
    table.mark_idle("b")
    assert table.statistics() == stats(2, 2, max_workers=2)

    assert table.remove("a") == "handle-a"
    assert "a" not in table
    assert not table.is_idle("a")
    assert table.lru_victim() == "b"
    assert table.has_room()
    assert table.statistics() == stats(1, 1, max_workers=2)

    table.add("a", "handle-a2")  # the tenant can come back
    assert table.keys() == ["b", "a"]
    assert table.statistics() == stats(2, 1, max_workers=2)


def test_remove_of_an_unknown_tenant_is_none(clock: FakeClock) -> None:
    table = make_table(clock, "a")
    assert table.remove("zz") is None
    assert table.statistics() == stats(1, 0)


def test_statistics_through_a_life_cycle(clock: FakeClock) -> None:
    table = make_table(clock, max_workers=3, idle_ttl=10.0)
    snapshots = [table.statistics()]
    table.add("a", "handle-a")
    snapshots.append(table.statistics())
    table.add("b", "handle-b")
    table.mark_idle("a")
    snapshots.append(table.statistics())
    table.mark_idle("b")
    snapshots.append(table.statistics())
    table.mark_busy("a")
    snapshots.append(table.statistics())
    table.remove("a")
    snapshots.append(table.statistics())
    table.remove("b")
    snapshots.append(table.statistics())
    assert snapshots == [
        TableStatistics(entries=0, idle=0, max_workers=3),
        TableStatistics(entries=1, idle=0, max_workers=3),
        TableStatistics(entries=2, idle=1, max_workers=3),
        TableStatistics(entries=2, idle=2, max_workers=3),
        TableStatistics(entries=2, idle=1, max_workers=3),
        TableStatistics(entries=1, idle=1, max_workers=3),
        TableStatistics(entries=0, idle=0, max_workers=3),
    ]


def test_marks_for_a_stale_handle_are_ignored(clock: FakeClock) -> None:
    """A handle that is no longer the tenant's entry (replaced) cannot change its marks."""
    table = make_table(clock, "a")
    current = table.peek("a")
    assert current is not None
    assert table.mark_idle("a", "handle-old") is None
    assert not table.is_idle("a")
    table.mark_idle("a", current)
    table.mark_busy("a", "handle-old")
    assert table.is_idle("a")
    table.mark_busy("a", current)
    assert not table.is_idle("a")


def test_mark_idle_returns_the_expiry_of_the_only_idle_entry(clock: FakeClock) -> None:
    table = make_table(clock, "a", "b")
    assert table.mark_idle("a") == 1010.0  # the only idle entry: it expires next
    clock.now += 1
    assert table.mark_idle("b") is None  # a later expiry than a's
    table.mark_busy("a")
    clock.now += 1
    assert table.mark_idle("a") is None  # b is idle: a expires after it
    assert make_table(clock, "c", idle_ttl=None).mark_idle("c") is None  # no TTL
