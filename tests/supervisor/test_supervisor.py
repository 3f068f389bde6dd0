"""Supervisor behaviour with real worker processes, real pipes and real signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest

import corral
from corral import Rung, StopReason, Supervisor
from corral.supervisor._handle import WorkerHandle
from tests.helpers import FAST, EventLog, K, pid_gone, supervisor, wait_pid_gone, worker_info


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def handle_of(sup: Supervisor, tenant: str) -> WorkerHandle:
    """The pool's handle of ``tenant``'s worker: for the table's idle mark, which nothing
    public shows (everything else is in stats(), events and errors)."""
    handle = sup._table.peek(tenant)
    assert handle is not None, f"{tenant} has no worker"
    return handle


async def pid_of(sup: Supervisor, tenant: str) -> int:
    info = await sup.call(tenant, "whoami")
    return int(info["pid"])


# -- the basic contract ------------------------------------------------------------------------


async def test_call_roundtrip_and_kernel_error_keeps_worker(start_method: str) -> None:
    async with supervisor(start_method=start_method) as sup:
        assert await sup.call("t", "echo", {"a": [1, 2, 3]}) == {"a": [1, 2, 3]}
        assert await sup.call("t", "add", 2, b=5) == 7
        assert await sup.call("t", "async_echo", "x", delay=0.0) == "x"
        pid = await pid_of(sup, "t")
        with pytest.raises(corral.KernelError) as err:
            await sup.call("t", "fail", "boom")
        assert err.value.remote_type == "builtins.ValueError"
        assert err.value.remote_message == "boom"
        assert (
            "in fail" in err.value.remote_traceback
            and "ValueError: boom" in err.value.remote_traceback
        )
        assert await pid_of(sup, "t") == pid  # the worker stayed up
        assert "t" in sup and len(sup) == 1 and sup.keys() == ["t"]
        info = sup.stats().workers[0]
        assert (info.tenant, info.pid, info.state, info.in_flight) == ("t", pid, "ready", 0)
        assert info.requests == 6
    assert pid_gone(pid)


async def test_invalid_calls_are_refused_and_the_worker_stays() -> None:
    async with supervisor(max_frame_bytes=1 << 20) as sup:
        pid = await pid_of(sup, "t")
        with pytest.raises(corral.InvalidCallError, match="public identifier"):
            await sup.call("t", "_private")
        with pytest.raises(corral.InvalidCallError, match="not a public method"):
            await sup.call("t", "no_such_method")
        with pytest.raises(corral.InvalidCallError, match="cannot be sent"):
            await sup.call("t", "echo", object())
        with pytest.raises(corral.InvalidCallError, match="over max_frame_bytes"):
            await sup.call("t", "echo", b"x" * (2 << 20))
        with pytest.raises(corral.InvalidCallError, match="result cannot be sent"):
            await sup.call("t", "unencodable")
        with pytest.raises(corral.InvalidCallError, match="exceeds the limit"):
            await sup.call("t", "big", 2 << 20)
        with pytest.raises(ValueError, match="tenant"):
            await sup.call("", "echo", 1)
        assert await pid_of(sup, "t") == pid


async def test_many_concurrent_calls_on_one_worker_get_their_own_results() -> None:
    async with supervisor() as sup:
        values = list(range(200))
        results = await asyncio.gather(
            *(sup.call("t", "async_echo", v, delay=0.001 * (v % 7)) for v in values),
            *(sup.call("t", "echo", -v) for v in values),
        )
        assert results == values + [-v for v in values]
        assert sup.stats().starts == 1


# -- invariant 1: single-flight ----------------------------------------------------------------


async def test_concurrent_first_calls_share_one_spawn(start_method: str) -> None:
    async with supervisor(start_method=start_method) as sup:
        infos = await asyncio.gather(*(sup.call("t", "whoami") for _ in range(20)))
        assert len({i["pid"] for i in infos}) == 1
        assert sup.stats().starts == 1


async def test_failed_spawn_fails_every_waiter_with_the_same_error_and_leaves_no_entry() -> None:
    async with Supervisor("tests.kernels:broken", restart_intensity=100, **FAST) as sup:
        results = await asyncio.gather(
            *(sup.call("t", "echo", 1) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, corral.StartError) for r in results)
        assert len({str(r) for r in results}) == 1
        err = results[0]
        assert isinstance(err, corral.StartError)
        assert err.remote_type == "builtins.RuntimeError"
        assert "factory refuses t" in str(err)
        assert err.remote_traceback is not None and "RuntimeError" in err.remote_traceback
        assert sup.stats().starts == 1
        assert "t" not in sup and sup.keys() == []


@pytest.mark.parametrize(
    ("factory", "start_timeout", "expected"),
    [
        # Only the start that never ends is about the start timeout: the others get a
        # generous one, so that a slow start on a busy host does not change their error.
        ("tests.kernels:hang_on_import", 1.0, "did not become ready within 1.0s"),
        ("tests.kernels:exits_in_factory", 20.0, "exited while starting: exited with code 7"),
        ("tests.nope:make", 20.0, "ModuleNotFoundError"),
    ],
)
async def test_start_failures_are_typed_and_leave_nothing(
    factory: str, start_timeout: float, expected: str
) -> None:
    async with Supervisor(
        factory, start_timeout=start_timeout, term_timeout=0.5, shutdown_timeout=0.5
    ) as sup:
        with pytest.raises(corral.StartError, match=expected) as err:
            await sup.call("t", "echo", 1)
        assert "t" not in sup
        if err.value.pid is not None:
            await wait_pid_gone(err.value.pid)


async def test_async_and_callable_factories() -> None:
    async with Supervisor("tests.kernels:async_factory", **FAST) as sup:
        assert await sup.call("t", "echo", 1) == 1
    prefix = "closure-"

    def factory(tenant: str) -> Any:
        from tests.kernels import Kernel

        return Kernel(prefix + tenant)

    async with Supervisor(factory, **FAST) as sup:
        assert (await sup.call("t", "whoami"))["tenant"] == "closure-t"


# -- invariant 7: LRU and idle TTL -------------------------------------------------------------


async def test_lru_evicts_the_least_recently_used_idle_worker(start_method: str) -> None:
    async with supervisor(max_workers=2, start_method=start_method) as sup:
        pid_a = await pid_of(sup, "a")
        await pid_of(sup, "b")
        await pid_of(sup, "c")
        assert sup.keys() == ["b", "c"]
        assert pid_gone(pid_a)
        assert sup.stats().stops == {"lru": 1}
        await sup.call("b", "echo", 1)  # b becomes most recently used
        await pid_of(sup, "d")
        assert sup.keys() == ["b", "d"]


async def test_a_caller_waiting_for_room_stops_one_victim_not_each_worker_turning_idle() -> None:
    # Regression: a worker turning idle while the caller's first victim was still stopping
    # woke the caller, which stopped that worker too.
    opts = {"shutdown_timeout": 1.0, "term_timeout": 1.0}  # a's stop takes a second
    async with Supervisor("tests.kernels:stubborn", max_workers=2, **opts) as sup:
        assert await sup.call("a", "echo", 1) == 1
        held = asyncio.create_task(sup.call("b", "hold", "gate"))
        assert await sup.call("b", "wait_entered", "gate") is True
        c = asyncio.create_task(sup.call("c", "echo", 3))  # no room: a, idle, is the victim
        # The release is sent after c's first step: a is stopping, and b turns idle now.
        assert await sup.call("b", "release", "gate") is True
        assert await held == "released gate"
        async with asyncio.timeout(10):
            assert await c == 3
        assert sup.keys() == ["b", "c"]
        assert sup.stats().stops == {"lru": 1}


async def test_a_worker_is_marked_idle_one_loop_iteration_after_its_last_reply() -> None:
    # The table's idle mark waits for the tasks a reply wakes (a caller that calls again at
    # once never takes the worker through the table); by then it must still be idle.
    async with supervisor() as sup:
        assert await sup.call("t", "echo", 1) == 1
        handle = handle_of(sup, "t")
        assert handle.state.value == "ready"  # at once, for stats() and the caller
        await asyncio.sleep(0)  # ok-sleep: one loop iteration, not a wait for time
        assert sup._table.is_idle("t")
        assert await sup.call("t", "echo", 2) == 2
        assert not sup._table.is_idle("t")  # not yet...
        handle.evict(StopReason.EVICTED)  # ...and stopped within that iteration:
        await asyncio.sleep(0)  # ok-sleep: one loop iteration, not a wait for time
        assert not sup._table.is_idle("t")  # a stopping worker is never marked idle
        async with asyncio.timeout(10):
            assert (await handle.wait_dead()).reason is StopReason.EVICTED


async def test_idle_ttl_is_enforced_by_the_reaper_without_access() -> None:
    log = EventLog()
    async with supervisor(idle_ttl=0.3, on_event=log) as sup:
        pid = await pid_of(sup, "t")
        stop = await log.stopped("t", 10)
        assert (stop.reason, stop.rung, stop.returncode) == ("idle_ttl", "ask", 0)
        assert "t" not in sup and pid_gone(pid)


async def test_in_flight_call_is_not_cut_by_ttl_and_idle_counts_from_completion() -> None:
    loop = asyncio.get_running_loop()
    ttl, delay = 0.3, 0.8
    log = EventLog()
    async with supervisor(idle_ttl=ttl, on_event=log) as sup:
        pid = await pid_of(sup, "t")
        # The call outlives the TTL twice over; it must complete on the same worker.
        sent = loop.time()
        assert await sup.call("t", "async_echo", "done", delay=delay) == "done"
        info = worker_info(sup, "t")
        assert (info.pid, info.state) == (pid, "ready") and not pid_gone(pid)
        stop = await log.stopped("t", 30)
        assert stop.reason == "idle_ttl"
        # By construction, not by the host's speed: the call completed no earlier than
        # `delay` after it was sent, and the TTL counts from there (counted from the call's
        # start, the worker would have gone at once after it).
        assert loop.time() - sent >= delay + ttl


async def test_lru_never_cuts_a_busy_worker_the_new_tenant_waits_for_room() -> None:
    async with supervisor(max_workers=1, pool_timeout=30) as sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        assert await sup.call("a", "wait_entered", "g") is True
        started_b = asyncio.create_task(sup.call("b", "echo", "b"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn so b starts waiting
        assert not started_b.done() and sup.keys() == ["a"]
        assert await sup.call("a", "release", "g") is True
        assert await held == "released g"
        assert await started_b == "b"
        assert sup.keys() == ["b"]


async def test_no_room_within_pool_timeout_is_a_capacity_error() -> None:
    async with supervisor(max_workers=1, pool_timeout=0.2) as sup:
        held = asyncio.create_task(sup.call("a", "hold", "g"))
        await sup.call("a", "wait_entered", "g")
        with pytest.raises(corral.CapacityError, match="busy"):
            await sup.call("b", "echo", 1)
        await sup.call("a", "release", "g")
        await held


async def test_evict_drains_a_busy_worker_then_returns_once_it_is_gone() -> None:
    log = EventLog()
    async with supervisor(on_event=log) as sup:
        pid = await pid_of(sup, "t")
        slow = asyncio.create_task(sup.call("t", "async_echo", "slow", delay=0.5))
        await asyncio.sleep(0)  # ok-sleep: one loop turn so the call is sent
        assert worker_info(sup, "t").state == "busy"
        evicting = asyncio.create_task(sup.evict("t"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn so the eviction begins
        assert worker_info(sup, "t").state == "draining"
        assert await slow == "slow"  # the call in flight completed
        assert await evicting is True
        assert pid_gone(pid) and "t" not in sup
        assert (await log.stopped("t", 0)).reason == "evicted"
        assert await sup.evict("t") is False


async def test_call_during_stop_waits_and_gets_a_new_worker() -> None:
    async with Supervisor("tests.kernels:stubborn", shutdown_timeout=0.5, term_timeout=2) as sup:
        old = await pid_of(sup, "t")
        evicting = asyncio.create_task(sup.evict("t"))
        await asyncio.sleep(0)  # ok-sleep: one loop turn so the eviction begins
        new = await pid_of(sup, "t")  # waits for the old one to be gone: never two at once
        assert new != old and pid_gone(old)
        assert await evicting is True


# -- invariants 2, 10: crashes, timeouts, protocol violations ----------------------------------


async def test_crash_fails_only_that_tenants_calls_and_the_next_call_respawns(
    start_method: str,
) -> None:
    async with supervisor(start_method=start_method) as sup:
        pid = await pid_of(sup, "t")
        other = await pid_of(sup, "other")
        held = asyncio.create_task(sup.call("t", "hold", "g"))
        await sup.call("t", "wait_entered", "g")
        with pytest.raises(corral.WorkerCrashedError) as err:
            await sup.call("t", "crash", 3)
        assert err.value.exitcode == 3 and err.value.signal is None
        assert "exited with code 3" in str(err.value)
        with pytest.raises(corral.WorkerCrashedError):
            await held
        assert await pid_of(sup, "other") == other
        assert await pid_of(sup, "t") != pid
        assert sup.stats().stops == {"crashed": 1}


@pytest.mark.parametrize(
    ("method", "args", "exitcode", "signum"),
    [
        ("kill_self", (signal.SIGKILL,), None, signal.SIGKILL),
        ("kill_self", (signal.SIGSEGV,), None, signal.SIGSEGV),
        ("exit_cleanly", (), 0, None),
    ],
)
async def test_death_is_reported_with_exit_code_or_signal(
    method: str, args: tuple[int, ...], exitcode: int | None, signum: int | None
) -> None:
    async with supervisor() as sup:
        with pytest.raises(corral.WorkerCrashedError) as err:
            await sup.call("t", method, *args)
        assert (err.value.exitcode, err.value.signal) == (exitcode, signum)


async def test_timeout_kills_the_worker_while_other_tenants_carry_on(start_method: str) -> None:
    async with supervisor(call_timeout=0.5, start_method=start_method) as sup:
        # Only the spin is about call_timeout: every other call has a generous timeout of
        # its own, so that a busy host cannot time them out.
        pid = (await sup.invoke("t", "whoami", timeout=30))["pid"]
        spinning = asyncio.create_task(sup.call("t", "spin"))
        for i in range(5):
            assert await sup.invoke("other", "echo", (i,), timeout=30) == i
        with pytest.raises(corral.CallTimeoutError) as err:
            await spinning
        assert isinstance(err.value, TimeoutError)
        await wait_pid_gone(pid)
        assert (await sup.invoke("t", "whoami", timeout=30))["pid"] != pid
        assert sup.stats().stops == {"timeout": 1}


async def test_per_call_timeout_overrides_the_default() -> None:
    async with supervisor(call_timeout=None) as sup:
        with pytest.raises(corral.CallTimeoutError):
            await sup.invoke("t", "spin", (), timeout=0.3)
        assert await sup.invoke("t", "add", (1, 2), timeout=None) == 3


@pytest.mark.parametrize(
    ("method", "args", "match"),
    [
        ("garbage", (), "malformed frame"),
        ("oversize", (2 << 20,), "outside 1..1048576"),
        ("unknown_reply", (), "unknown call id"),
    ],
)
async def test_protocol_violations_kill_the_worker(
    method: str, args: tuple[int, ...], match: str
) -> None:
    async with supervisor(max_frame_bytes=1 << 20) as sup:
        pid = await pid_of(sup, "t")
        with pytest.raises(corral.ProtocolError, match=match):
            await sup.invoke("t", method, args, timeout=10)
        await wait_pid_gone(pid)
        assert await pid_of(sup, "t") != pid
        assert sup.stats().stops == {"protocol_error": 1}


async def test_a_worker_that_closes_its_pipe_is_killed() -> None:
    async with supervisor() as sup:
        with pytest.raises(corral.WorkerCrashedError, match="closed its pipe"):
            await sup.invoke("t", "close_pipe", timeout=10)


async def test_a_cancelled_caller_abandons_the_call_but_not_the_worker() -> None:
    async with supervisor() as sup:
        pid = await pid_of(sup, "t")
        held = asyncio.create_task(sup.call("t", "hold", "g"))
        await sup.call("t", "wait_entered", "g")
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert worker_info(sup, "t").in_flight == 1  # the worker still runs it
        await sup.call("t", "release", "g")
        # The released call finishes in the worker's next loop turn, before it reads this one.
        await sup.call("t", "echo", 1)
        info = worker_info(sup, "t")
        assert (info.in_flight, info.state) == (0, "ready")
        assert await pid_of(sup, "t") == pid


# -- invariants 5, 6: termination escalates and nothing is left behind -------------------------


async def test_graceful_stop_runs_the_shutdown_hook(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="corral")
    log = EventLog()
    async with supervisor(on_event=log) as sup:
        await pid_of(sup, "t")
        assert await sup.evict("t") is True
        stop = await log.stopped("t", 0)  # evict() returned: it is gone
        assert (stop.rung, stop.returncode) == (Rung.ASK.value, 0)
    records = [r for r in caplog.records if r.name == "corral.worker"]
    assert any("shutdown hook ran for t" in r.getMessage() for r in records)
    assert all(getattr(r, "tenant", None) == "t" for r in records)


@pytest.mark.parametrize(
    ("tenant", "term_timeout", "rung", "returncode"),
    [
        # SIGTERM ends "hangs": a generous term_timeout, so that a busy host reaping it
        # late does not make it a SIGKILL; "ignore-term" is about term_timeout running out.
        ("hangs", 20.0, Rung.TERM, -signal.SIGTERM),
        ("ignore-term", 0.3, Rung.KILL, -signal.SIGKILL),
    ],
)
async def test_termination_escalates(
    tenant: str, term_timeout: float, rung: Rung, returncode: int
) -> None:
    log = EventLog()
    async with Supervisor(
        "tests.kernels:stubborn", shutdown_timeout=0.3, term_timeout=term_timeout, on_event=log
    ) as sup:
        pid = await pid_of(sup, tenant)
        assert await sup.evict(tenant) is True
        stop = await log.stopped(tenant, 0)  # evict() returned: it is gone
        assert (stop.rung, stop.returncode) == (rung.value, returncode)
        assert pid_gone(pid)


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("how", ["evict", "crash", "close"])
async def test_a_workers_own_children_are_reaped(detach: bool, how: str) -> None:
    async with supervisor() as sup:
        child = await sup.call("t", "start_child", detach)
        assert not pid_gone(child)
        if how == "evict":
            await sup.evict("t")
        elif how == "crash":
            with pytest.raises(corral.WorkerCrashedError):
                await sup.call("t", "crash")
        else:
            await sup.aclose()
        await wait_pid_gone(child)


async def test_close_drains_then_stops_and_refuses_new_calls() -> None:
    sup = supervisor(drain_timeout=0.3)
    with pytest.raises(corral.SupervisorClosedError, match="not running"):
        await sup.call("t", "echo", 1)
    await sup.start()
    pid = await pid_of(sup, "t")
    held = asyncio.create_task(sup.call("t", "hold", "never"))
    await sup.call("t", "wait_entered", "never")
    await sup.aclose()
    with pytest.raises(corral.WorkerStoppedError) as err:
        await held
    assert err.value.reason == "closed"
    assert pid_gone(pid)
    with pytest.raises(corral.SupervisorClosedError):
        await sup.call("t", "echo", 1)
    await sup.aclose()  # idempotent


# -- invariant 8: a clean process ---------------------------------------------------------------


async def test_worker_environment_is_an_allowlist_set_at_exec(
    start_method: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "hunter2")
    marker = os.open(tmp_path / "host-secret-file", os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(marker, True)
    try:
        async with Supervisor(
            K,
            start_method=start_method,
            env={"EXTRA": "1"},
            **FAST,  # type: ignore[arg-type]
        ) as sup:
            env = await sup.call("t", "env")
            assert "CORRAL_TEST_SECRET" not in env
            assert env["EXTRA"] == "1"
            # HOME and TMPDIR point into the worker's scratch dir (set for a fresh interpreter)
            allowed = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "EXTRA", "HOME", "TMPDIR"}
            assert set(env) <= allowed
            fds = await sup.call("t", "open_fds")
            assert fds[:5] == [0, 1, 2, 3, 4]
            info = await sup.call("t", "whoami")
            links = []
            for fd in fds:
                try:
                    links.append(os.readlink(f"/proc/{info['pid']}/fd/{fd}"))
                except OSError:
                    pass
            assert not any("host-secret-file" in link for link in links)
            assert info["ppid"] != os.getpid()  # started by the warden, never forked from us
    finally:
        os.close(marker)


# -- invariant 13: crash loops back off ---------------------------------------------------------


async def test_a_crash_looping_tenant_is_refused_fast_with_retry_after() -> None:
    async with Supervisor(
        "tests.kernels:broken", restart_intensity=2, restart_period=60, backoff_base=30, **FAST
    ) as sup:
        for _ in range(3):
            with pytest.raises(corral.StartError):
                await sup.call("t", "echo", 1)
        with pytest.raises(corral.BackoffError) as err:
            await sup.call("t", "echo", 1)
        assert 0 < err.value.retry_after <= 30
        assert "start_failed" in err.value.last_error
        assert sup.stats().starts == 3 and sup.stats().tenants_in_backoff == 1
        with pytest.raises(corral.StartError):  # other tenants are not affected
            await sup.call("u", "echo", 1)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"idle_ttl": -1}, "idle_ttl"),
        ({"call_timeout": 0}, "call_timeout"),
        ({"start_method": "fork"}, "never forked"),
        ({"max_frame_bytes": 10}, "max_frame_bytes"),
        ({"restart_intensity": -1}, "restart_intensity"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Supervisor(K, **kwargs)


def test_bad_factories_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"package\.module:callable"):
        Supervisor("not a factory")
    with pytest.raises(TypeError, match="import string or a callable"):
        Supervisor(42)  # type: ignore[arg-type]


async def test_corral_installs_no_signal_handlers_in_the_host() -> None:
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in watched}
    async with supervisor() as sup:
        await sup.call("t", "echo", 1)
        with pytest.raises(corral.WorkerCrashedError):
            await sup.call("t", "crash")
        assert {s: signal.getsignal(s) for s in watched} == before
    assert {s: signal.getsignal(s) for s in watched} == before


async def test_a_flood_of_worker_output_is_bounded_and_the_worker_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral.worker")
    async with supervisor() as sup:
        assert await sup.call("t", "print_lines", 20_000) == 20_000
        pid = await pid_of(sup, "t")
        await sup.evict("t")  # closing the log pipe logs what is left and the dropped count
        assert pid_gone(pid)
    lines = [r for r in caplog.records if r.name == "corral.worker" and "line " in r.getMessage()]
    dropped = [r for r in caplog.records if "output lines dropped" in r.getMessage()]
    assert 0 < len(lines) < 20_000
    assert dropped and all(getattr(r, "tenant", None) == "t" for r in dropped)


async def test_structs_and_dataclasses_travel_as_maps_and_rss_is_sampled() -> None:
    import dataclasses

    import msgspec

    class Point(msgspec.Struct):
        x: int
        y: int

    @dataclasses.dataclass
    class Box:
        name: str
        size: tuple[int, int]

    async with supervisor(memory_check_interval=0.05) as sup:
        assert await sup.call("t", "echo", Point(1, 2)) == {"x": 1, "y": 2}
        assert await sup.call("t", "echo", Box("b", (3, 4))) == {"name": "b", "size": [3, 4]}
        async with asyncio.timeout(10):
            while sup.stats().workers[0].rss is None:  # noqa: ASYNC110 (sampler has no event)
                await asyncio.sleep(0.05)  # ok-sleep: waiting for the periodic sampler
        rss = sup.stats().workers[0].rss
        assert rss is not None and 1 << 20 < rss < 1 << 30


def test_call_and_invoke_present_as_coroutine_functions() -> None:
    """They are plain methods returning a coroutine (a frame less per call), marked so that
    introspection sees coroutine functions: hosts' autospec mocks must stay awaitable."""
    from unittest import mock

    for name in ("call", "invoke"):
        assert asyncio.iscoroutinefunction(getattr(Supervisor, name)), name
        assert isinstance(getattr(mock.create_autospec(Supervisor), name), mock.AsyncMock), name
