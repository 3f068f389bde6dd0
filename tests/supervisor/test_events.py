"""Lifecycle events: the ``on_event`` hook and the ``events()`` async iterator see the
same events, in order, with the reasons the supervisor recorded."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

import corral
from corral import Supervisor, WorkerEvent
from tests.helpers import FAST, K

pytestmark = pytest.mark.timeout(30)


def brief(events: list[WorkerEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.kind, e.tenant, getattr(e, "reason", None)) for e in events]


async def test_start_ready_crash_backoff_and_close_arrive_in_order() -> None:
    hooked: list[WorkerEvent] = []
    async with Supervisor(
        K, restart_intensity=1, restart_period=60, backoff_base=30, on_event=hooked.append, **FAST
    ) as sup:
        seen: list[WorkerEvent] = []

        async def read() -> None:
            async for event in sup.events():
                seen.append(event)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)  # ok-sleep: one loop turn, so the reader subscribes
        hooked.clear()
        assert await sup.call("a", "echo", 1) == 1
        with pytest.raises(corral.WorkerCrashedError):
            await sup.call("a", "crash", 3)
        with pytest.raises(corral.WorkerCrashedError):
            await sup.call("a", "crash", 3)  # the second failure in the period: backoff
        with pytest.raises(corral.BackoffError):
            await sup.call("a", "echo", 1)
        assert await sup.call("b", "echo", 2) == 2
    async with asyncio.timeout(20):  # a hang guard
        await reader  # ends by itself once the supervisor has closed
    expected = [
        ("starting", "a", None),
        ("ready", "a", None),
        ("stopped", "a", "crashed"),
        ("starting", "a", None),
        ("ready", "a", None),
        ("stopped", "a", "crashed"),
        ("backoff", "a", "crashed"),
        ("starting", "b", None),
        ("ready", "b", None),
        ("stopped", "b", "closed"),
    ]
    assert brief(seen) == expected
    assert brief(hooked) == expected
    (backoff,) = [e for e in seen if e.kind == "backoff"]
    assert backoff.retry_after is not None and backoff.retry_after > 1
    crashed = seen[2]
    assert crashed.returncode == 3 and crashed.pid is not None
    assert all(a.at <= b.at for a, b in itertools.pairwise(seen))


async def test_a_slow_reader_loses_the_oldest_events_not_the_supervisor() -> None:
    async with Supervisor(K, max_workers=1, **FAST) as sup:
        events = sup.events(buffer=2)
        first = asyncio.ensure_future(anext(events))  # subscribed, then never read again
        await asyncio.sleep(0)  # ok-sleep: one loop turn, so the reader subscribes
        for i in range(5):  # each call evicts the previous tenant: 3 events per tenant
            assert await sup.call(f"t{i}", "echo", i) == i
        got = await first
        rest = await _until_closed(sup, events)
    assert (got.kind, got.tenant) == ("starting", "t0")
    # 14 more events happened; the reader gets the newest that fit, the close's last
    assert 1 <= len(rest) <= 3, brief(rest)
    assert brief(rest)[-1] == ("stopped", "t4", "closed")


async def _until_closed(sup: Supervisor, events: Any) -> list[WorkerEvent]:
    out = []
    closing = asyncio.ensure_future(sup.aclose())
    async for event in events:
        out.append(event)
    await closing
    return out


async def test_events_after_close_end_at_once() -> None:
    sup = Supervisor(K, **FAST)
    await sup.start()
    await sup.aclose()
    async with asyncio.timeout(20):  # a hang guard
        assert [e async for e in sup.events()] == []
    with pytest.raises(ValueError, match="buffer"):
        await anext(sup.events(buffer=0))


async def test_a_reader_ends_when_the_supervisor_never_runs() -> None:
    """Regression: a reader subscribed before start() waited for ever when the
    supervisor was closed without running (or its start failed)."""
    sup = Supervisor(K, **FAST)
    events = sup.events()
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # ok-sleep: one loop turn, so the reader subscribes
    await sup.aclose()
    async with asyncio.timeout(20):  # a hang guard
        with pytest.raises(StopAsyncIteration):
            await first
