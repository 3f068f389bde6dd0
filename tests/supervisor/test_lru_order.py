"""``keys()`` and ``stats().workers`` are in exact LRU order the moment a call returns
(issue 14, point 1), with real workers: sequential calls, overlapping calls, evictions,
and the sync facade. The table's own rules are in ``test_table.py`` (fake clock)."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from corral import KernelError, Supervisor, SyncSupervisor
from tests.helpers import FAST, K, pid_gone, supervisor


def workers_order(sup: Supervisor | SyncSupervisor) -> list[str]:
    return [info.tenant for info in sup.stats().workers]


async def test_a_b_a_is_b_a_as_soon_as_the_call_returns() -> None:
    async with supervisor() as sup:
        await sup.call("a", "echo", 1)
        await sup.call("b", "echo", 1)
        await sup.call("a", "echo", 1)
        # No await in between: the idle marks of these calls may not have run yet.
        assert sup.keys() == ["b", "a"]
        assert workers_order(sup) == ["b", "a"]
        for tenant in ("c", "b", "a", "c", "b"):
            await sup.call(tenant, "echo", 1)
            assert sup.keys()[-1] == tenant
        assert sup.keys() == ["a", "c", "b"]
        assert workers_order(sup) == ["a", "c", "b"]
        await asyncio.sleep(0)  # ok-sleep: one loop iteration, for the deferred idle marks
        assert sup.keys() == ["a", "c", "b"]  # and change nothing


async def test_a_kernel_error_and_a_warm_start_count_as_use() -> None:
    async with supervisor() as sup:
        await sup.call("a", "echo", 1)
        await sup.get_or_create("b")
        assert sup.keys() == ["a", "b"]
        with pytest.raises(KernelError, match="boom"):
            await sup.call("a", "fail", "boom")
        assert sup.keys() == ["b", "a"]
        await sup.get_or_create("b")  # found, not started: still a use
        assert sup.keys() == ["a", "b"]


async def test_order_of_overlapping_calls_is_the_order_they_completed() -> None:
    """Many callers over a few tenants at once: after the last call, the order is that of
    each tenant's last completion, which is the order the callers got their results in."""
    rng = random.Random(14)
    tenants = [f"t{i}" for i in range(5)]
    returned: list[str] = []
    seen: list[tuple[list[str], list[str]]] = []  # (keys, workers) when the last call returned
    callers = 0

    async def caller(plan: list[str], sup: Supervisor) -> None:
        nonlocal callers
        for tenant in plan:
            await sup.call(tenant, "async_echo", tenant, delay=rng.choice((0.0, 0.0, 0.001)))
            returned.append(tenant)
        callers -= 1
        if callers == 0:  # the last call of all has just returned: look, with no await
            seen.append((sup.keys(), workers_order(sup)))

    async with supervisor(max_workers=8) as sup:
        for _ in range(5):
            returned.clear()
            plans = [[rng.choice(tenants) for _ in range(15)] for _ in range(8)]
            callers = len(plans)
            async with asyncio.TaskGroup() as tg:
                for plan in plans:
                    tg.create_task(caller(plan, sup))
            keys, workers = seen.pop()
            last = list(dict.fromkeys(reversed(returned)))[::-1]  # by last completion
            untouched = [t for t in keys if t not in last]
            assert keys == untouched + last
            assert workers == keys
            assert sup.keys() == keys  # and the deferred idle marks changed nothing


async def test_a_call_in_flight_keeps_the_place_of_its_start_until_it_completes() -> None:
    async with supervisor() as sup:
        for tenant in ("a", "b", "c"):
            await sup.call(tenant, "echo", 1)
        hold = asyncio.create_task(sup.call("a", "hold_until_signal", "g"))
        await sup.call("a", "wait_entered", "g")
        assert sup.keys() == ["b", "c", "a"]
        await sup.call("b", "echo", 1)
        await sup.call("c", "echo", 1)
        assert sup.keys() == ["a", "b", "c"]  # a's call is in flight, from before b's and c's
        kernel_pid = sup.stats().workers[0].kernel_pid
        assert kernel_pid is not None
        os.kill(kernel_pid, signal.SIGUSR1)  # a's call completes, with no new call to a
        assert await hold == "released g"
        assert sup.keys() == ["b", "c", "a"]
        assert workers_order(sup) == ["b", "c", "a"]


async def test_order_after_evict_and_after_an_lru_stop() -> None:
    async with supervisor(max_workers=3) as sup:
        for tenant in ("a", "b", "c", "a"):
            await sup.call(tenant, "echo", 1)
        assert sup.keys() == ["b", "c", "a"]
        assert await sup.evict("c") is True
        assert sup.keys() == ["b", "a"]
        assert workers_order(sup) == ["b", "a"]
        await sup.call("c", "echo", 1)
        await sup.call("b", "echo", 1)
        assert sup.keys() == ["a", "c", "b"]
        pid_a = sup.stats().workers[0].pid
        await sup.call("d", "echo", 1)  # full: a, the least recently used, makes room
        assert sup.keys() == ["c", "b", "d"]
        assert workers_order(sup) == ["c", "b", "d"]
        assert pid_a is not None and pid_gone(pid_a)
        assert sup.stats().stops == {"evicted": 1, "lru": 1}


def test_sync_facade_order_after_a_b_a_and_evict() -> None:
    with SyncSupervisor(K, **FAST) as sup:
        sup.call("a", "echo", 1)
        sup.call("b", "echo", 1)
        sup.call("a", "echo", 1)
        assert sup.keys() == ["b", "a"]
        assert workers_order(sup) == ["b", "a"]
        sup.call("c", "echo", 1)
        sup.call("b", "echo", 1)
        assert sup.keys() == ["a", "c", "b"]
        assert sup.evict("c") is True
        assert sup.keys() == ["a", "b"]
        assert workers_order(sup) == ["a", "b"]
