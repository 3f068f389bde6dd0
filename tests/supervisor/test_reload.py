"""Rolling reload: ``reload(tenant)`` / ``reload_all()`` replace workers with ones started
anew (the policy asked again), new calls go to the new worker while the old one
drains, no call fails because of a reload, and a version that fails to start leaves
the old worker serving."""

from __future__ import annotations

import asyncio
import time

import pytest

import corral
from corral import Supervisor, TenantPolicy
from tests.helpers import FAST, K, wait_until

pytestmark = pytest.mark.timeout(120)


class Versions:
    """A policy whose answer the test changes: the version (and factory) to roll out."""

    def __init__(self) -> None:
        self.version = "1"
        self.factory: str | None = None

    def __call__(self, tenant: str) -> TenantPolicy:
        return TenantPolicy(version=self.version, factory=self.factory)


async def test_reload_swaps_in_a_new_worker_while_the_old_one_drains() -> None:
    versions = Versions()
    events: list[corral.WorkerEvent] = []
    async with Supervisor(K, policy=versions, on_event=events.append, **FAST) as sup:
        old = await sup.get_or_create("t")
        assert old.version == "1"
        slow = asyncio.ensure_future(sup.call("t", "async_echo", "done", 1.5))
        assert await sup.call("t", "echo", 0) == 0  # (meanwhile the slow call was sent)
        assert sup.stats().workers[0].in_flight == 1
        versions.version = "2"
        new = await sup.reload("t")
        assert new is not None and new.pid != old.pid and new.version == "2"
        # listed: the new worker, then the old one still finishing its call
        workers = [(w.tenant, w.pid, w.version, w.state) for w in sup.stats().workers]
        assert workers == [("t", new.pid, "2", "ready"), ("t", old.pid, "1", "draining")]
        assert sup.keys() == ["t"] and len(sup) == 1
        # new calls go to the new worker while the old one finishes the slow call
        assert (await sup.call("t", "whoami"))["pid"] == new.pid
        assert not slow.done()
        assert await slow == "done"
        await sup.evict("t")
    # (closed: every stop is reported by now, the old worker's drain included)
    stops = {(e.pid, e.reason) for e in events if isinstance(e, corral.WorkerStopped)}
    assert stops == {(old.pid, "reloaded"), (new.pid, "evicted")}
    starts = [e.tenant for e in events if isinstance(e, corral.WorkerStarting)]
    assert starts == ["t", "t"] and sup.stats().stops == {"reloaded": 1, "evicted": 1}


async def test_a_version_that_fails_to_start_leaves_the_old_worker_serving() -> None:
    versions = Versions()
    async with Supervisor(K, policy=versions, **FAST) as sup:
        old = await sup.get_or_create("t")
        versions.version, versions.factory = "broken", "no_such_module_xyz:make"
        with pytest.raises(corral.StartError, match="ModuleNotFoundError"):
            await sup.reload("t")
        assert [(w.pid, w.version) for w in sup.stats().workers] == [(old.pid, "1")]
        assert (await sup.call("t", "whoami"))["pid"] == old.pid
        versions.version, versions.factory = "3", None
        new = await sup.reload("t")
        assert new is not None and new.version == "3"


async def test_reload_without_a_worker_does_nothing() -> None:
    async with Supervisor(K, **FAST) as sup:
        assert await sup.reload("nobody") is None
        assert sup.keys() == [] and sup.stats().starts == 0
        with pytest.raises(corral.InvalidCallError):
            await sup.reload("not/a/key")


async def test_without_a_free_slot_the_old_worker_drains_first() -> None:
    versions = Versions()
    async with Supervisor(K, max_workers=1, policy=versions, **FAST) as sup:
        old = await sup.get_or_create("t")
        versions.version = "2"
        calls = [asyncio.ensure_future(sup.call("t", "async_echo", i, 0.05)) for i in range(20)]
        new = await sup.reload("t")
        assert new is not None and new.pid != old.pid and new.version == "2"
        assert await asyncio.gather(*calls) == list(range(20))  # none failed
        assert len(sup) == 1


async def test_reloading_every_tenant_under_load_fails_no_call() -> None:
    """Every tenant reloaded again and again while callers call them without pause:
    every call succeeds (the figure for 30 s is in benchmarks/reload_soak.py)."""
    versions = Versions()
    tenants = [f"t{i}" for i in range(4)]
    async with Supervisor(K, max_workers=8, policy=versions, **FAST) as sup:
        for tenant in tenants:
            await sup.get_or_create(tenant)
        stop = asyncio.Event()
        counts = {"ok": 0}

        async def caller(tenant: str) -> None:
            i = 0
            while not stop.is_set():
                assert await sup.call(tenant, "echo", i) == i
                counts["ok"] += 1
                i += 1

        async def reloader() -> int:
            rounds = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                versions.version = str(rounds)
                outcome = await sup.reload_all()
                assert all(isinstance(v, corral.WorkerInfo) for v in outcome.values()), outcome
                rounds += 1
            stop.set()
            return rounds

        callers = [asyncio.ensure_future(caller(t)) for t in tenants for _ in range(2)]
        rounds = await reloader()
        await asyncio.gather(*callers)  # any failed call raises here
        assert rounds >= 3 and counts["ok"] > 100
        stats = sup.stats()
        serving = [w for w in stats.workers if w.state in ("ready", "busy")]
        assert len(serving) == len(tenants)
        assert {w.version for w in serving} == {str(rounds - 1)}
        assert set(stats.stops) == {"reloaded"} and stats.tenants_in_backoff == 0


async def test_a_replaced_worker_counts_until_it_is_gone_and_closing_lets_it_finish() -> None:
    """max_workers holds while old workers drain: reloading twice during a long call never
    has more than max_workers processes; aclose() lets the old one finish its call."""
    versions = Versions()
    async with Supervisor(K, max_workers=2, policy=versions, **FAST) as sup:
        first = await sup.get_or_create("t")
        slow = asyncio.ensure_future(sup.call("t", "async_echo", "done", 2.0))
        assert await sup.call("t", "echo", 0) == 0  # (meanwhile the slow call was sent)
        versions.version = "2"
        second = await sup.reload("t")  # a free slot: beside the old one
        assert second is not None
        assert [w.pid for w in sup.stats().workers] == [second.pid, first.pid]
        versions.version = "3"
        third = await sup.reload("t")  # no free slot: the old one still counts
        assert third is not None and third.version == "3"
        assert len(sup.stats().workers) <= 2
        assert await slow == "done"
    assert sup.stats().stops == {"reloaded": 2, "closed": 1}


async def test_a_cancelled_reload_leaves_no_worker_behind() -> None:
    """The caller gives up while the new worker starts: it is stopped (reason reloaded)
    and counted until reaped; the old one serves on, alone."""
    versions = Versions()
    async with Supervisor(K, policy=versions, **FAST) as sup:
        old = await sup.get_or_create("t")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):  # cancelled at its first wait
                await sup.reload("t")
        await wait_until(lambda: sup.stats().stops == {"reloaded": 1})
        assert [(w.pid, w.state) for w in sup.stats().workers] == [(old.pid, "ready")]
        assert (await sup.call("t", "whoami"))["pid"] == old.pid
        again = await sup.reload("t")  # the tenant's reload turn was released
        assert again is not None and again.pid != old.pid
