"""The pool's behaviour through the public Supervisor, on in-memory workers.

Each test runs a real :class:`~corral.Supervisor` (its pool, handles, pipes and frame
protocol) whose launcher is a :class:`tests.fakes.FakeLauncher`: no process starts, so
a test takes milliseconds. Time that decides (TTL, backoff) is a :class:`FakeClock`;
time that only bounds a wait (stop rungs, start and call timeouts) is short and real.
The same behaviour with real processes is in ``test_supervisor.py`` and its neighbours.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Literal

import msgspec
import pytest

import corral
from corral import Supervisor
from corral.ipc import FrameDecoder, FromWorker, Hello, Result, Start, encode_frame
from tests.fakes import FAKE_PID_BASE, FakeLauncher, WorkerExit, fake_supervisor
from tests.helpers import EventLog, FakeClock, stopped, within, worker_info

pytestmark = pytest.mark.timeout(5)

WAIT = 2.0  # seconds: a deadline for what takes milliseconds


def brief(log: EventLog) -> list[tuple[str, str, str | None]]:
    return log.brief()


# -- the fake itself ---------------------------------------------------------------------------


async def _read_frame(fd: int, decoder: FrameDecoder[FromWorker]) -> FromWorker:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            readable = asyncio.Event()
            loop.add_reader(fd, readable.set)
            try:
                await within(readable.wait(), WAIT)
            finally:
                loop.remove_reader(fd)
            continue
        assert data, "EOF"
        (msg,) = decoder.feed(data)
        return msg


async def test_the_fake_speaks_the_protocol_and_reports_an_exit_from_the_loop(
    fake_launcher: FakeLauncher,
) -> None:
    exits: list[tuple[int | None, bool]] = []
    proc = await fake_launcher.spawn(lambda code, oom: exits.append((code, oom)), None)
    try:
        assert proc.pid >= FAKE_PID_BASE
        os.write(proc.to_worker, encode_frame(Start("t", "x:y", None, [], 1 << 20)))
        decoder: FrameDecoder[FromWorker] = FrameDecoder(FromWorker)
        hello = await _read_frame(proc.from_worker, decoder)
        assert isinstance(hello, Hello) and hello.pid == proc.pid
        fake_launcher.signal(proc.pid, signal.SIGTERM)
        assert exits == []  # never from inside signal()
        await fake_launcher.wait_for(lambda: exits, WAIT)
        assert exits == [(-signal.SIGTERM, False)]
        assert os.read(proc.from_worker, 1) == b""  # its end is closed
        assert fake_launcher.live() == [] and fake_launcher.starts_of("t") == 1
    finally:
        for fd in proc[1:]:
            os.close(fd)
        await fake_launcher.aclose()


# -- calls -------------------------------------------------------------------------------------


async def test_calls_travel_the_real_protocol_to_an_in_memory_kernel(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher) as sup:
        assert await sup.call("t", "echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert await sup.call("t", "add", 2, b=5) == 7
        assert await sup.call("t", "async_echo", "x") == "x"
        with pytest.raises(corral.KernelError) as err:
            await sup.call("t", "fail", "boom")
        assert (err.value.remote_type, err.value.remote_message) == ("builtins.ValueError", "boom")
        with pytest.raises(corral.InvalidCallError, match="not a public method"):
            await sup.call("t", "nope")
        info = worker_info(sup, "t")
        assert (info.pid, info.state, info.requests) == (FAKE_PID_BASE, "ready", 5)
        [worker] = fake_launcher.spawned
        assert worker.start is not None and worker.start.factory == "tests.fakes:FakeKernel"
        assert worker.calls == 5 and worker.kernel.calls == 1
    assert worker.returncode == 0 and worker.kernel.shut_down  # asked to go: shutdown() ran


async def test_a_hundred_first_calls_for_a_tenant_start_one_worker(
    fake_launcher: FakeLauncher,
) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, on_event=log) as sup:
        results = await within(asyncio.gather(*(sup.call("t", "echo", i) for i in range(100))))
        assert results == list(range(100))
        assert len(fake_launcher.spawned) == 1 and sup.stats().starts == 1
        assert brief(log) == [("starting", "t", None), ("ready", "t", None)]


# -- LRU and room ------------------------------------------------------------------------------


async def test_lru_stops_the_idle_worker_used_longest_ago(fake_launcher: FakeLauncher) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, max_workers=3, on_event=log) as sup:
        for tenant in "abc":
            await sup.call(tenant, "echo", tenant)
        await sup.call("a", "echo", 1)  # b is now the least recently used
        assert sup.keys() == ["b", "c", "a"]
        await sup.call("d", "echo", 1)
        assert sup.keys() == ["c", "a", "d"]
        await sup.call("e", "echo", 1)
        assert sup.keys() == ["a", "d", "e"]
        stops = [e for e in log.items if isinstance(e, corral.WorkerStopped)]
        assert [(e.tenant, e.reason, e.rung, e.returncode) for e in stops] == [
            ("b", "lru", "ask", 0),
            ("c", "lru", "ask", 0),
        ]
        assert sup.stats().stops == {"lru": 2} and len(fake_launcher.live()) == 3


async def test_a_busy_worker_is_never_the_lru_victim(fake_launcher: FakeLauncher) -> None:
    async with fake_supervisor(fake_launcher, max_workers=2) as sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        await sup.call("b", "echo", 1)
        assert sup.keys() == ["a", "b"]  # a is the least recently used, but busy
        await sup.call("c", "echo", 1)
        assert sup.keys() == ["a", "c"]
        fake_launcher.gates["g"].open()
        assert await within(held, WAIT) == "released g"


async def test_a_new_tenant_waits_for_room_and_gets_the_slot_when_a_call_ends(
    fake_launcher: FakeLauncher,
) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, max_workers=1, pool_timeout=30, on_event=log) as sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        waiting = asyncio.create_task(sup.call("b", "echo", "b"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn: b's call runs up to its wait for room
        assert not waiting.done() and sup.keys() == ["a"] and len(fake_launcher.spawned) == 1
        fake_launcher.gates["g"].open()
        assert await within(held, WAIT) == "released g"
        assert await within(waiting, WAIT) == "b"
        assert sup.keys() == ["b"]
        assert brief(log) == [
            ("starting", "a", None),
            ("ready", "a", None),
            ("stopped", "a", "lru"),  # b's start waited for a to be gone
            ("starting", "b", None),
            ("ready", "b", None),
        ]


async def test_no_room_within_pool_timeout_is_a_capacity_error(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher, max_workers=1, pool_timeout=0.01) as sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        with pytest.raises(corral.CapacityError, match="all 1 workers are busy"):
            await within(sup.call("b", "echo", 1), WAIT)
        assert sup.keys() == ["a"] and len(fake_launcher.spawned) == 1
        fake_launcher.gates["g"].open()
        await within(held, WAIT)


# -- TTL, on the fake clock --------------------------------------------------------------------

# The sweeper sleeps until the next expiry as the clock says it, in real seconds: a tiny
# idle_ttl makes it look again every few milliseconds, and the fake clock decides. A
# worker is marked idle one loop iteration after its last reply (so that a caller that
# calls again at once never takes it through the table): the tests let that iteration
# pass before they move the clock.
TTL = 0.005


async def _marked_idle() -> None:
    await asyncio.sleep(0)  # ok-sleep: one loop turn: the idle mark follows the reply's


async def test_an_idle_worker_expires_when_the_clock_says_so(fake_launcher: FakeLauncher) -> None:
    clock = FakeClock()
    log = EventLog(clock)  # stamped with the fake clock
    async with fake_supervisor(fake_launcher, idle_ttl=TTL, clock=clock, on_event=log) as sup:
        await sup.call("t", "echo", 1)
        await _marked_idle()
        idle_since = clock()
        clock.advance(TTL)
        at, stop = await log.first(stopped("t"), WAIT)
        assert isinstance(stop, corral.WorkerStopped)
        assert (stop.reason, stop.rung, stop.returncode) == ("idle_ttl", "ask", 0)
        assert at == idle_since + TTL  # not a moment before the clock moved
        assert "t" not in sup and sup.stats().stops == {"idle_ttl": 1}


async def test_a_busy_worker_does_not_expire_and_its_ttl_counts_from_its_reply(
    fake_launcher: FakeLauncher,
) -> None:
    clock = FakeClock()
    log = EventLog(clock)
    async with fake_supervisor(fake_launcher, idle_ttl=TTL, clock=clock, on_event=log) as sup:
        held = asyncio.create_task(sup.call("busy", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        await sup.call("idle", "echo", 1)
        await _marked_idle()
        clock.advance(10 * TTL)
        await log.stopped("idle", WAIT)
        # The sweep that expired "idle" looked at "busy" too: busy is not idle.
        info = worker_info(sup, "busy")
        assert (info.state, info.stop_reason) == ("busy", None)
        fake_launcher.gates["g"].open()
        assert await within(held, WAIT) == "released g"
        await _marked_idle()
        replied = clock()
        clock.advance(TTL)
        at, stop = await log.first(stopped("busy"), WAIT)
        assert isinstance(stop, corral.WorkerStopped)
        assert at == replied + TTL and stop.reason == "idle_ttl"


# -- failures and backoff ----------------------------------------------------------------------


async def _crash(sup: Supervisor, tenant: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(corral.WorkerCrashedError, match="exited with code 3") as err:
            await within(sup.call(tenant, "crash", 3), WAIT)
        assert err.value.exitcode == 3


async def test_repeated_crashes_open_a_backoff_that_doubles_and_a_success_ends(
    fake_launcher: FakeLauncher,
) -> None:
    clock = FakeClock()
    log = EventLog()
    options: dict[str, Any] = {
        "restart_intensity": 2,
        "restart_period": 60.0,
        "backoff_base": 4.0,
        "backoff_max": 8.0,
    }
    async with fake_supervisor(fake_launcher, clock=clock, on_event=log, **options) as sup:
        await _crash(sup, "t", 3)  # the third failure within the period opens a backoff
        with pytest.raises(corral.BackoffError) as err:
            await sup.call("t", "echo", 1)
        assert (err.value.retry_after, err.value.level) == (4.0, 1)
        assert "crashed (return code 3)" in err.value.last_error
        assert sup.stats().tenants_in_backoff == 1 and len(fake_launcher.spawned) == 3
        assert await sup.call("u", "echo", 1) == 1  # other tenants are not held back

        clock.advance(4.0)
        await _crash(sup, "t", 3)  # no success in between: the next backoff doubles
        with pytest.raises(corral.BackoffError) as err:
            await sup.call("t", "echo", 1)
        assert (err.value.retry_after, err.value.level) == (8.0, 2)

        clock.advance(8.0)
        assert await sup.call("t", "echo", 1) == 1  # recovered; the success forgives
        assert sup.stats().tenants_in_backoff == 0
        await _crash(sup, "t", 3)
        with pytest.raises(corral.BackoffError) as err:
            await sup.call("t", "echo", 1)
        assert (err.value.retry_after, err.value.level) == (4.0, 1)
        backoffs = [e for e in log.items if isinstance(e, corral.TenantBackoff)]
        assert [(e.tenant, e.reason, e.retry_after) for e in backoffs] == [
            ("t", "crashed", 4.0),
            ("t", "crashed", 8.0),
            ("t", "crashed", 4.0),
        ]


async def test_start_failures_count_and_launch_failures_do_not(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher, restart_intensity=0, clock=FakeClock()) as sup:
        fake_launcher.spawn_error = "no fds left"
        for _ in range(2):  # corral's own trouble: never the tenant's backoff
            with pytest.raises(corral.StartError, match="no fds left"):
                await sup.call("t", "echo", 1)
        fake_launcher.spawn_error = None
        fake_launcher.script("t", "fail")
        with pytest.raises(corral.StartError, match="scripted start failure") as err:
            await sup.call("t", "echo", 1)
        assert err.value.remote_type == "builtins.RuntimeError"
        with pytest.raises(corral.BackoffError):
            await sup.call("t", "echo", 1)
        assert sup.stats().stops == {"launch_failed": 2, "start_failed": 1}


@pytest.mark.parametrize(
    ("start", "reason", "returncode"),
    [("hang", "start_timeout", -signal.SIGKILL), (7, "start_failed", 7)],
    ids=["hangs", "exits"],
)
async def test_a_start_that_hangs_or_exits_fails_its_callers(
    fake_launcher: FakeLauncher, start: Literal["hang"] | int, reason: str, returncode: int
) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, start_timeout=0.01, on_event=log) as sup:
        fake_launcher.script("t", start)
        results = await within(
            asyncio.gather(*(sup.call("t", "echo", 1) for _ in range(3)), return_exceptions=True)
        )
        assert all(isinstance(r, corral.StartError) for r in results), results
        assert len({str(r) for r in results}) == 1  # one start, one error for every waiter
        stop = await log.stopped("t", WAIT)
        assert (stop.reason, stop.returncode) == (reason, returncode)
        fake_launcher.script("t")
        assert await sup.call("t", "echo", 2) == 2


async def test_a_spawn_that_hangs_is_bounded_by_start_timeout(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher, start_timeout=0.01) as sup:
        fake_launcher.hold_spawns()
        with pytest.raises(corral.StartError, match="did not start the process within"):
            await within(sup.call("t", "echo", 1), WAIT)
        fake_launcher.release_spawns()
        assert await sup.call("t", "echo", 2) == 2
        assert sup.stats().stops == {"launch_failed": 1}


async def test_a_crash_fails_only_its_tenants_calls(fake_launcher: FakeLauncher) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, on_event=log) as sup:
        await sup.call("other", "echo", 1)
        held = asyncio.create_task(sup.call("t", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        worker = fake_launcher.worker("t")
        assert worker is not None
        worker.exit(-signal.SIGSEGV)  # from outside, mid-call
        with pytest.raises(corral.WorkerCrashedError, match="SIGSEGV") as err:
            await within(held, WAIT)
        assert err.value.signal == signal.SIGSEGV
        stop = await log.stopped("t", WAIT)
        assert (stop.reason, stop.rung, stop.returncode) == ("crashed", "none", -signal.SIGSEGV)
        assert await sup.call("other", "echo", 2) == 2 and await sup.call("t", "echo", 3) == 3
        assert worker_info(sup, "other").pid == FAKE_PID_BASE  # the same worker throughout


async def test_a_call_past_its_timeout_kills_the_worker(fake_launcher: FakeLauncher) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, on_event=log) as sup:
        with pytest.raises(corral.CallTimeoutError):
            await within(sup.invoke("t", "hold", ("g",), timeout=0.01), WAIT)
        stop = await log.stopped("t", WAIT)
        assert (stop.reason, stop.rung, stop.returncode) == ("timeout", "kill", -signal.SIGKILL)


async def test_a_reply_to_no_call_is_a_protocol_error(fake_launcher: FakeLauncher) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, on_event=log) as sup:
        await sup.call("t", "echo", 1)
        worker = fake_launcher.worker("t")
        assert worker is not None
        forged = Result(99, msgspec.Raw(msgspec.msgpack.encode("forged")))
        await worker.send_raw(encode_frame(forged))
        stop = await log.stopped("t", WAIT)
        assert (stop.reason, stop.rung, stop.returncode) == (
            "protocol_error",
            "kill",
            -signal.SIGKILL,
        )
        assert await sup.call("t", "echo", 2) == 2  # a new worker


async def test_a_kernel_that_exits_in_an_async_method_crashes_its_worker(
    fake_launcher: FakeLauncher,
) -> None:
    class Quitter:
        async def quit(self, code: int) -> None:
            raise WorkerExit(code)

    fake_launcher.factory = lambda tenant: Quitter()
    async with fake_supervisor(fake_launcher) as sup:
        with pytest.raises(corral.WorkerCrashedError, match="exited with code 9"):
            await within(sup.call("t", "quit", 9), WAIT)


# -- stopping ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stubborn", "rung", "returncode"),
    [
        ({}, "ask", 0),
        ({"ignore_shutdown": True}, "term", -signal.SIGTERM),
        ({"ignore_shutdown": True, "ignore_term": True}, "kill", -signal.SIGKILL),
    ],
    ids=["shutdown", "sigterm", "sigkill"],
)
async def test_a_stop_climbs_the_rungs_as_far_as_it_must(
    fake_launcher: FakeLauncher, stubborn: dict[str, bool], rung: str, returncode: int
) -> None:
    log = EventLog()
    fast = {"shutdown_timeout": 0.01, "term_timeout": 0.01}
    async with fake_supervisor(fake_launcher, on_event=log, **fast) as sup:
        fake_launcher.script("t", **stubborn)
        await sup.call("t", "echo", 1)
        assert await within(sup.evict("t"), WAIT) is True
        stop = await log.stopped("t", 0)  # evict() returned: it is gone already
        assert (stop.reason, stop.rung, stop.returncode) == ("evicted", rung, returncode)
        assert "t" not in sup and fake_launcher.live() == []
        assert await sup.evict("t") is False


async def test_evict_drains_a_busy_worker_and_evict_all_counts(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher) as sup:
        for tenant in "ab":
            await sup.call(tenant, "echo", 1)
        held = asyncio.create_task(sup.call("c", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        evicting = asyncio.create_task(sup.evict("c"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn: evict() marks it draining at once
        assert worker_info(sup, "c").state == "draining" and not evicting.done()
        fake_launcher.gates["g"].open()
        assert await within(held, WAIT) == "released g"  # the call in flight completed
        assert await within(evicting, WAIT) is True
        assert await within(sup.evict_all(), WAIT) == 2
        assert sup.keys() == [] and fake_launcher.live() == []
        assert sup.stats().stops == {"evicted": 3}


async def test_evict_while_starting_fails_every_waiter_with_one_error(
    fake_launcher: FakeLauncher,
) -> None:
    async with fake_supervisor(fake_launcher) as sup:
        fake_launcher.script("t", "hang")
        calls = [asyncio.create_task(sup.call("t", "echo", 1)) for _ in range(3)]
        await fake_launcher.started("t", WAIT)
        assert worker_info(sup, "t").state == "starting"
        assert await within(sup.evict("t"), WAIT) is True
        results = await within(asyncio.gather(*calls, return_exceptions=True), WAIT)
        assert all(isinstance(r, corral.StartError) for r in results), results
        assert len({str(r) for r in results}) == 1
        assert sup.stats().stops == {"evicted": 1}


async def test_aclose_drains_then_stops_and_waiters_for_room_are_refused(
    fake_launcher: FakeLauncher,
) -> None:
    sup = fake_supervisor(fake_launcher, max_workers=1, drain_timeout=0.01, pool_timeout=30)
    async with sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        await fake_launcher.gates["g"].wait_entered(WAIT)
        waiting = asyncio.create_task(sup.call("b", "echo", 1))
        await asyncio.sleep(0)  # ok-sleep: one loop turn: b's call runs up to its wait for room
    with pytest.raises(corral.WorkerStoppedError):
        await within(held, WAIT)  # drained for drain_timeout, then stopped
    with pytest.raises(corral.SupervisorClosedError):
        await within(waiting, WAIT)
    assert fake_launcher.closed and fake_launcher.live() == []
    assert sup.stats().state == "closed"


# -- events ------------------------------------------------------------------------------------


async def test_events_tell_a_workers_life_in_order(fake_launcher: FakeLauncher) -> None:
    log = EventLog()
    async with fake_supervisor(fake_launcher, restart_intensity=0, on_event=log) as sup:
        await sup.call("a", "echo", 1)
        with pytest.raises(corral.WorkerCrashedError):
            await sup.call("a", "crash", 5)
        await sup.call("b", "echo", 1)
        await sup.evict("b")
        await sup.call("c", "echo", 1)
    assert brief(log) == [
        ("starting", "a", None),
        ("ready", "a", None),
        ("stopped", "a", "crashed"),
        ("backoff", "a", "crashed"),
        ("starting", "b", None),
        ("ready", "b", None),
        ("stopped", "b", "evicted"),
        ("starting", "c", None),
        ("ready", "c", None),
        ("stopped", "c", "closed"),
    ]
    a, b, c = FAKE_PID_BASE, FAKE_PID_BASE + 1, FAKE_PID_BASE + 2
    assert [e.pid for e in log.items] == [None, a, a, None, None, b, b, None, c, c]
    crashed = log.items[2]
    assert isinstance(crashed, corral.WorkerStopped)
    assert (crashed.rung, crashed.returncode) == ("none", 5)
