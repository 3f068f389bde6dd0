"""Pressure on the supervisor itself: callers cancelled mid-call, callers that give up
while a worker is starting, and ``evict``, ``call``, the TTL reaper and ``aclose()``
racing for one key, many times over.

What must hold: nothing deadlocks (every await has a deadline), nothing is lost (every
call resolves; an abandoned call is still answered by the worker and leaves nothing in
flight), and there are never two live workers for one key. The last is checked three
ways, each of which can fail (``test_the_overlap_detectors_can_fail`` shows the first two
firing): the kernels' per-tenant ``flock`` (see kernels.py), :class:`AnswerWatch` on every
answer (a process that answered for the key before must have exited when another one
answers), and, with a single key, the count of live worker processes (at most one).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import corral
from corral import Supervisor
from tests.helpers import pid_gone
from tests.reliability import (
    KERNEL,
    AnswerWatch,
    CorralLogs,
    LoopErrors,
    MiB,
    PidLedger,
    Resources,
    descendants,
    leftover_processes,
    live_grandchildren,
    make_lock_dir,
    overlap_options,
    table_problems,
    temporary_directory,
)
from tests.reliability.kernels import SLOW_PREFIX, SLOW_START_S, STUCK_PREFIX

pytestmark = pytest.mark.timeout(120)
scratch_fixture = pytest.fixture(temporary_directory, name="scratch")

ROUNDS = 30
DEADLINE = 20.0  # the test's own bound on any one await; past it, something hangs
FAST: dict[str, Any] = {"shutdown_timeout": 1.0, "term_timeout": 0.5, "start_timeout": 10.0}


def _answer_ok(value: Any, tenant: str, req: int, nonce: str) -> bool:
    expected = {"tenant": tenant, "req": req, "nonce": nonce, "overlap": False}
    return isinstance(value, dict) and {k: value.get(k) for k in expected} == expected


def _worker(sup: Supervisor, tenant: str) -> corral.WorkerInfo:
    (info,) = [w for w in sup.stats().workers if w.tenant == tenant]
    return info


class EventLog:
    """Collects the supervisor's events (the ``on_event`` hook) and wakes waiters."""

    def __init__(self) -> None:
        self.events: list[corral.WorkerEvent] = []
        self.wake = asyncio.Event()

    def __call__(self, event: corral.WorkerEvent) -> None:
        self.events.append(event)
        self.wake.set()

    async def first(
        self, kind: str, *, pid: int | None = None, tenant: str | None = None
    ) -> corral.WorkerEvent:
        """The first event so far, or to come, of ``kind`` for ``pid`` or ``tenant``."""
        async with asyncio.timeout(DEADLINE):
            while True:
                for event in self.events:
                    if event.kind == kind and (pid is None or event.pid == pid):
                        if tenant is None or event.tenant == tenant:
                            return event
                self.wake.clear()
                await self.wake.wait()


# -- cancelled callers --------------------------------------------------------------------------


async def test_cancelled_callers_abandon_their_calls_and_nothing_stays_in_flight() -> None:
    """Callers cancelled at random points (before their call is sent, right after, while
    it runs, while it is held in the kernel): each abandoned call that was sent is still
    answered by the worker, which keeps serving (same pid), and none stays in flight. The
    worker's ``requests`` count must equal exactly the number of calls sent."""
    rng = random.Random(secrets.token_hex(4))
    reqs = itertools.count(1)
    sent = 0
    cancelled_at: Counter[str] = Counter()
    async with Supervisor(KERNEL, **FAST) as sup:
        pid = (await sup.get_or_create("t")).pid
        for round_ in range(60):
            tasks: list[tuple[asyncio.Task[Any], int, str]] = []
            for _ in range(10):
                req, nonce = next(reqs), secrets.token_hex(4)
                kind = rng.choice(("echo", "aecho", "hold"))
                if kind == "echo":
                    coro = sup.call("t", "echo", req, nonce)
                elif kind == "aecho":
                    coro = sup.call("t", "aecho", req, nonce, delay=rng.choice((0.0, 0.002, 0.01)))
                else:
                    coro = sup.call("t", "hold", req, nonce, f"g{round_}")
                tasks.append((asyncio.ensure_future(coro), req, nonce))
            # Cancel some before they run at all (never sent), the rest after 1..3 loop turns
            # (sent: the warm path sends without awaiting) or once they may have finished.
            before = [t for t in tasks if rng.random() < 0.3]
            for task, _, _ in before:
                task.cancel()
            for _ in range(rng.randint(1, 3)):
                await asyncio.sleep(0)  # ok-sleep: one loop turn, so that the rest are sent
            sent += len(tasks) - len(before)
            for task, _, _ in tasks:
                if not task.done() and rng.random() < 0.7:
                    task.cancel()
            async with asyncio.timeout(DEADLINE):
                assert await sup.call("t", "release", f"g{round_}") is True
                results = await asyncio.gather(*(t for t, _, _ in tasks), return_exceptions=True)
                assert await sup.call("t", "settle") == 0  # every abandoned call has answered
            sent += 2
            for (task, req, nonce), result in zip(tasks, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    cancelled_at[
                        "before sending" if (task, req, nonce) in before else "in flight"
                    ] += 1
                else:
                    assert _answer_ok(result, "t", req, nonce), result
                    cancelled_at["not cancelled"] += 1
            info = _worker(sup, "t")
            assert (info.pid, info.in_flight, info.state) == (pid, 0, "ready"), info
            assert info.requests == sent, (info.requests, sent)
        assert sup.stats().starts == 1 and sup.stats().stops == {}
    print(f"\ncancelled callers: {sent} calls sent on one worker, callers {dict(cancelled_at)}")
    assert cancelled_at["in flight"] > 50 and cancelled_at["before sending"] > 50


async def test_an_abandoned_runaway_call_still_kills_its_worker_at_its_timeout() -> None:
    """A caller that walks away from a call that will never finish: the call's own
    deadline still kills the worker (no one awaits it), and the next call gets a new one."""
    log = EventLog()
    async with Supervisor(KERNEL, on_event=log, **FAST) as sup:
        for i in range(10):
            pid = (await sup.get_or_create("t")).pid
            assert pid is not None
            kind = ("hang", "ahang")[i % 2]
            task = asyncio.ensure_future(sup.invoke("t", kind, timeout=0.2))
            await asyncio.sleep(0)  # ok-sleep: one loop turn, so that the call is sent
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            end = await log.first("stopped", pid=pid)
            assert (end.reason, end.rung) == ("timeout", "kill"), end
            assert pid_gone(pid)
            answer = await sup.call("t", "echo", i, "n")
            assert _answer_ok(answer, "t", i, "n") and answer["pid"] != pid
        assert sup.stats().stops == {"timeout": 10}


async def test_a_caller_cancelled_while_waiting_for_room_starts_nothing() -> None:
    """max_workers=1 and that worker busy: callers for other tenants wait for room. Once
    cancelled, they must neither start a worker later nor keep the busy one from being
    reused; a caller that stays gets its worker once the slot frees."""
    async with Supervisor(KERNEL, max_workers=1, pool_timeout=DEADLINE, **FAST) as sup:
        held = asyncio.ensure_future(sup.call("a", "hold", 1, "n", "g"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn, so that the call is sent
        waiting = [asyncio.ensure_future(sup.call(f"w{i}", "echo", i, "n")) for i in range(20)]
        staying = asyncio.ensure_future(sup.call("stay", "echo", 99, "n"))
        for _ in range(3):
            await asyncio.sleep(0)  # ok-sleep: loop turns, so that they all wait for room
        assert sup.keys() == ["a"] and not any(t.done() for t in [*waiting, staying])
        for task in waiting:
            task.cancel()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*waiting, return_exceptions=True)
            assert await sup.call("a", "release", "g") is True
            assert _answer_ok(await held, "a", 1, "n")
            assert _answer_ok(await staying, "stay", 99, "n")
        assert sup.keys() == ["stay"]
        stats = sup.stats()
        assert stats.starts == 2 and stats.stops == {"lru": 1}, stats


# -- callers that give up while a worker starts -------------------------------------------------


async def test_callers_timing_out_while_a_slow_worker_starts() -> None:
    """A factory that takes SLOW_START_S. Callers with deadlines shorter than that give up
    (asyncio's TimeoutError: corral's call timeout counts from sending, not from starting);
    the start goes on: callers with longer deadlines get the one worker it made (one of
    them with a call timeout shorter than the start, which counts from sending), and there
    is one start per tenant. A worker whose every caller gave up is not pinned: it becomes
    idle, so the TTL reaper stops it and LRU may take its slot."""
    log = EventLog()
    outcomes: Counter[str] = Counter()

    async def caller(tenant: str, req: int, deadline: float, call_timeout: float | None) -> Any:
        async with asyncio.timeout(deadline):
            return await sup.invoke(tenant, "echo", (req, "n"), timeout=call_timeout)

    async with Supervisor(KERNEL, idle_ttl=0.2, max_workers=4, on_event=log, **FAST) as sup:
        for i in range(9):
            tenant = f"{SLOW_PREFIX}{i}"
            everyone_gives_up = i % 3 == 0
            deadlines = [0.02, 0.05, 0.1] + ([] if everyone_gives_up else [DEADLINE] * 3)

            results = await asyncio.gather(
                *(
                    # The last caller's own call timeout is shorter than the start (which
                    # cannot take less than SLOW_START_S), so it is met only because it counts
                    # from sending; yet long enough for one echo on a busy host.
                    caller(
                        tenant,
                        r,
                        d,
                        call_timeout=SLOW_START_S / 2 if r == len(deadlines) - 1 else None,
                    )
                    for r, d in enumerate(deadlines)
                ),
                return_exceptions=True,
            )
            pids = set()
            for req, (deadline, result) in enumerate(zip(deadlines, results, strict=True)):
                if deadline < SLOW_START_S:
                    assert type(result) is TimeoutError, result  # not corral's CallTimeoutError
                    outcomes["gave up while starting"] += 1
                else:
                    assert not isinstance(result, BaseException), result
                    assert _answer_ok(result, tenant, req, "n"), result
                    pids.add(result["pid"])
                    outcomes["answered"] += 1
            assert len(pids) <= 1
            # The worker started anyway (for everyone_gives_up, nobody ever called it; it may
            # already be reaped: only its events tell).
            ready = await log.first("ready", tenant=tenant)
            if not everyone_gives_up:
                assert pids == {ready.pid}
            # Not pinned: reaped by the TTL (or taken by LRU for the next slow tenant).
            end = await log.first("stopped", pid=ready.pid)
            assert end.reason in ("idle_ttl", "lru"), end
            outcomes[f"stopped by {end.reason}"] += 1
        stats = sup.stats()
        assert stats.starts == 9, stats
    print(f"\nslow starts: {dict(outcomes)}")


# -- evict, call, TTL reaper and aclose() racing for one key ------------------------------------


class Race:
    """One supervisor, one key, everything at once, then aclose() in the middle of it."""

    ALLOWED = (
        corral.StartError,  # evicted while starting ("stopped before it was ready")
        corral.WorkerStoppedError,  # the drain deadline of an evict, or of aclose()
    )  # and SupervisorClosedError once aclose() began; nothing else

    def __init__(self, sup: Supervisor, watch: AnswerWatch, rng: random.Random) -> None:
        self.sup = sup
        self.watch = watch
        self.rng = rng
        self.reqs = itertools.count(1)
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.max_live = 0
        self.checks = 0
        self.ledger = PidLedger()  # every worker pid seen, to check none outlives aclose()

    async def caller(self) -> None:
        """Calls until the supervisor is closed; pauses of about idle_ttl let the reaper
        fire just as the next call arrives; now and then it gives up on a call after a
        few milliseconds (cancelled while it waits for a start, a stop, or its answer)."""
        while True:
            req, nonce = next(self.reqs), secrets.token_hex(4)
            kind = self.rng.choice(("echo", "aecho", "get_or_create"))
            give_up = self.rng.uniform(0.001, 0.03) if self.rng.random() < 0.15 else None
            try:
                async with asyncio.timeout(give_up):
                    value = await self._one(kind, req, nonce)
            except corral.SupervisorClosedError:
                self.outcomes["SupervisorClosedError"] += 1
                return
            except self.ALLOWED as exc:
                self.outcomes[type(exc).__name__] += 1
                if exc.tenant != "k" or not (
                    "stopped before it was ready" in str(exc)
                    if isinstance(exc, corral.StartError)
                    else exc.reason in ("evicted", "closed")
                ):
                    self.failures.append(f"{kind} {req}: {exc!r}")
            except corral.CorralError as exc:
                self.outcomes[type(exc).__name__] += 1
                self.failures.append(f"{kind} {req}: {exc!r}")
            except TimeoutError:  # asyncio's: this caller gave up
                self.outcomes["caller gave up"] += 1
            else:
                self.outcomes[f"{kind} answered"] += 1
                if not _answer_ok(value, "k", req, nonce):
                    self.failures.append(f"{kind} {req} (nonce {nonce}) got {value!r}")
                else:
                    self.watch.answered("k", value["pid"])
                    self.ledger.saw(value["pid"])
            if self.rng.random() < 0.6:
                await asyncio.sleep(self.rng.uniform(0.03, 0.08))  # ok-sleep: around idle_ttl

    async def _one(self, kind: str, req: int, nonce: str) -> Any:
        if kind == "echo":
            return await self.sup.call("k", "echo", req, nonce)
        if kind == "aecho":
            delay = self.rng.choice((0.0, 0.005, 0.03))
            return await self.sup.call("k", "aecho", req, nonce, delay=delay)
        info = await self.sup.get_or_create("k")  # a ready worker: any earlier one is gone
        if info.tenant != "k" or info.pid is None:
            self.failures.append(f"get_or_create('k') -> {info}")
        return {"tenant": "k", "pid": info.pid, "req": req, "nonce": nonce, "overlap": False}

    async def evictor(self) -> None:
        """evict() or evict_all() until the supervisor closes; now and then it stops
        waiting for the worker to be gone (the stop goes on)."""
        while self.sup.stats().state == "running":
            give_up = self.rng.uniform(0.001, 0.03) if self.rng.random() < 0.15 else None
            try:
                async with asyncio.timeout(give_up):
                    if self.rng.random() < 0.2:
                        self.outcomes[f"evict_all -> {await self.sup.evict_all()}"] += 1
                    else:
                        self.outcomes[f"evict -> {await self.sup.evict('k')}"] += 1
            except TimeoutError:
                self.outcomes["evictor gave up"] += 1
            await asyncio.sleep(self.rng.uniform(0.02, 0.2))  # ok-sleep: eviction pacing

    async def observer(self) -> None:
        """At every loop turn: the table is sound; every few, at most one live worker
        process (one key: never two at once, whatever is starting or stopping)."""
        for turn in itertools.count():
            if self.sup.stats().state == "closed":
                return
            self.checks += 1
            self.failures.extend(table_problems(self.sup))
            if turn % 50 == 0:
                live = live_grandchildren()
                for pid in live:
                    self.ledger.saw(pid)
                self.max_live = max(self.max_live, len(live))
                if len(live) > 1:
                    self.failures.append(f"two live workers for one key: {live}")
            await asyncio.sleep(0)  # ok-sleep: one loop turn between checks


async def test_evict_call_ttl_reaper_and_aclose_race_for_one_key(scratch: Path) -> None:
    """ROUNDS rounds; each a new supervisor (idle_ttl 0.05 s, drain_timeout 0.05 s) with
    one to four callers (calls, get_or_create, pauses about the TTL, callers giving up)
    and, in most rounds, an evictor on one key, an observer, and aclose() at a random
    moment in the middle of it all (in some rounds a first aclose() is cancelled)."""
    seed = secrets.token_hex(4)
    rng = random.Random(seed)
    lock_dir = make_lock_dir(scratch, ["k"])
    options = {**FAST, "idle_ttl": 0.05, "drain_timeout": 0.05, **overlap_options(lock_dir)}
    procs_before, threads_before = descendants(), set(threading.enumerate())
    async with Supervisor(KERNEL, **options) as warm:  # first-use imports and caches
        await warm.call("k", "echo", 0, "warm")
    before = Resources.now(settle=threads_before)
    totals: Counter[str] = Counter()
    stops: Counter[str] = Counter()
    watch = AnswerWatch()
    failures: list[str] = []
    max_live = checks = 0
    with CorralLogs.attached() as logs, LoopErrors().installed() as loop_errors:
        for _ in range(ROUNDS):
            sup = Supervisor(KERNEL, **options)
            await sup.start()
            race = Race(sup, watch, rng)
            # Few callers and no evictor: mostly the TTL reaper against calls; more callers
            # and an evictor: mostly evict against calls. aclose() joins in either way.
            tasks = [asyncio.ensure_future(race.caller()) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.6:
                tasks.append(asyncio.ensure_future(race.evictor()))
            tasks.append(asyncio.ensure_future(race.observer()))
            try:
                async with asyncio.timeout(DEADLINE):
                    await asyncio.sleep(rng.uniform(0.05, 0.4))  # ok-sleep: when aclose() comes
                    if rng.random() < 0.3:  # a closer that is cancelled: the shutdown goes on
                        closing = asyncio.ensure_future(sup.aclose())
                        for _ in range(rng.randint(0, 3)):
                            await asyncio.sleep(0)  # ok-sleep: loop turns before the cancel
                        closing.cancel()
                        await asyncio.gather(closing, return_exceptions=True)
                        totals["aclose() cancelled"] += 1
                    await sup.aclose()  # (again:) returns once the shutdown is complete
                    if sup.stats().state != "closed" or race.ledger.still_running():
                        running = race.ledger.still_running()
                        failures.append(f"aclose() returned with {running} running: {sup.stats()}")
                    await asyncio.gather(*tasks)  # each ends once it sees the supervisor closed
            finally:
                for task in tasks:
                    task.cancel()  # only if the round failed: they are done otherwise
                await asyncio.gather(*tasks, return_exceptions=True)
                await sup.aclose()
            leftovers = leftover_processes(procs_before)
            if leftovers:
                failures.append(f"processes left after aclose(): {leftovers}")
            stats = sup.stats()
            if stats.workers or stats.state != "closed":
                failures.append(f"after aclose(): {stats}")
            totals.update(race.outcomes)
            stops.update(stats.stops)
            failures.extend(race.failures)
            max_live, checks = max(max_live, race.max_live), checks + race.checks
        watch.close()
    after = Resources.now(settle=threads_before)
    leaks = after.leaks_since(before, 8 * MiB)
    print(
        f"\nrace (seed {seed}): {ROUNDS} rounds, outcomes {dict(totals.most_common())}\n"
        f"  workers stopped by {dict(stops)}; {checks} table checks, max live workers "
        f"{max_live}; {watch.answers} answers checked\n"
        f"  before {before.describe()}; after {after.describe()}\n"
        f"  failures: {len(failures)}; overlaps: {len(watch.violations) + len(logs.overlaps)}"
        f"; loop errors: {len(loop_errors.errors)}; corral errors logged: {len(logs.errors)}"
        f"; leaks: {len(leaks)}"
    )
    assert not failures, failures[:20]
    assert not watch.violations and not logs.overlaps, (watch.violations, logs.overlaps)
    assert not logs.errors, logs.errors[:20]
    assert not loop_errors.errors, loop_errors.errors[:20]
    assert not leaks, leaks
    # It raced: each party won sometimes.
    assert stops["idle_ttl"] and stops["evicted"] and stops["closed"], stops
    assert totals["echo answered"] and totals["aecho answered"] and totals["evict -> True"]
    assert totals["aclose() cancelled"], totals


async def test_aclose_resolves_every_waiter_and_starts_nothing_more() -> None:
    """aclose() while callers wait in each place a call can wait: on a call in flight
    (held in the kernel), for a worker's start (its factory never returns), and for a slot
    (max_workers=2, both taken). Each resolves within the deadline, with the error that
    says why, and no worker starts once aclose() has begun."""
    log = EventLog()
    sup = Supervisor(
        KERNEL, max_workers=2, pool_timeout=DEADLINE, drain_timeout=0.2, on_event=log, **FAST
    )
    await sup.start()
    try:
        held = asyncio.ensure_future(sup.call("a", "hold", 1, "n", "never"))
        await log.first("ready", tenant="a")
        slow = f"{STUCK_PREFIX}x"
        starting = [asyncio.ensure_future(sup.call(slow, "echo", i, "n")) for i in range(5)]
        await log.first("starting", tenant=slow)
        waiting = [asyncio.ensure_future(sup.call(f"w{i}", "echo", i, "n")) for i in range(10)]
        for _ in range(3):
            await asyncio.sleep(0)  # ok-sleep: loop turns, so that they all wait for room
        assert sorted(sup.keys()) == ["a", slow]
        assert not any(t.done() for t in [held, *starting, *waiting])
        async with asyncio.timeout(DEADLINE):
            await sup.aclose()
            results = await asyncio.gather(held, *starting, *waiting, return_exceptions=True)
    finally:
        await sup.aclose()
    held_result, starting_results, waiting_results = results[0], results[1:6], results[6:]
    assert isinstance(held_result, corral.WorkerStoppedError), held_result
    assert held_result.reason == "closed"
    assert all(isinstance(r, corral.SupervisorClosedError) for r in starting_results), results
    assert all(isinstance(r, corral.SupervisorClosedError) for r in waiting_results), results
    stats = sup.stats()
    assert stats.starts == 2 and stats.stops == {"closed": 2}, stats
    assert [e.tenant for e in log.events if e.kind == "starting"] == ["a", slow]


# -- the detectors can fail ------------------------------------------------------------------------


async def test_the_overlap_detectors_can_fail(scratch: Path) -> None:
    """Two supervisors sharing the lock directory give one tenant two live workers, which
    corral itself never does: the kernels' lock and the AnswerWatch must both see it."""
    options = {**FAST, **overlap_options(make_lock_dir(scratch, ["dup"]))}
    watch = AnswerWatch()
    try:
        with CorralLogs.attached() as logs:
            async with Supervisor(KERNEL, **options) as one, Supervisor(KERNEL, **options) as two:
                first = await one.call("dup", "echo", 1, "a")
                second = await two.call("dup", "echo", 2, "b")
                for answer in (first, second):
                    watch.answered("dup", answer["pid"])
                # The first answer again, from a pid the watch knows: still a violation.
                watch.answered("dup", first["pid"])
    finally:
        watch.close()
    assert (first["overlap"], second["overlap"]) == (False, True)
    assert len(logs.overlaps) == 1 and f"pid={second['pid']}" in logs.overlaps[0]
    assert len(watch.violations) == 2, watch.violations
    # And a pid answering for two tenants is caught too.
    watch = AnswerWatch()
    try:
        watch.answered("a", os.getpid())
        watch.answered("b", os.getpid())
    finally:
        watch.close()
    assert watch.violations == [f"pid {os.getpid()} answered for 'a' and for 'b'"]
