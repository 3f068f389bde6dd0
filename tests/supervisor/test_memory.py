"""Memory governance: soft and hard per-worker limits, host and total pressure, the
baseline check at start, the probe and the pure policy.

* Real processes and real allocation where the OS must act (the soft limit on a leaking
  kernel, a memory bomb under the hard limit, threads under the hard limit, one real host
  pressure check, the probe's tree sums).
* A fake probe (chosen tree sizes and available memory) for pressure on a 24 GiB host.

Figures measured on the development host are printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

import corral
from corral import StopReason, Supervisor, WorkerEvent
from corral.supervisor._memory import MemoryPolicy, MemorySample, ProbeThread, ProcTreeProbe
from tests.helpers import (
    FAST,
    K,
    Recorder,
    pid_gone,
    stopped,
    supervisor,
    wait_pid_gone,
    worker_info,
)

MiB = 2**20
GiB = 2**30
HARD_LIMIT = 256 * MiB
BOMB_STEP_MB = 8

# -- helpers -----------------------------------------------------------------------------------


class Events(Recorder[WorkerEvent]):
    """The ``on_event`` hook. With ``sup`` set, it also notes the other workers' states at
    each stop (to show that stops happen one at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self.sup: Supervisor | None = None
        self.states_at_stop: dict[str, dict[str, str]] = {}
        self.reaped_at_stop: dict[str, bool] = {}

    def __call__(self, event: WorkerEvent) -> None:
        if event.kind == "stopped" and self.sup is not None:
            self.states_at_stop[event.tenant] = {
                w.tenant: w.state for w in self.sup.stats().workers
            }
            self.reaped_at_stop[event.tenant] = event.pid is not None and _reaped(event.pid)
        self.add(event)

    def stopped(self) -> list[tuple[str, str | None]]:
        return [(e.tenant, e.reason) for _, e in self.seen if e.kind == "stopped"]


def _reaped(pid: int) -> bool:
    """True if ``pid`` is gone and reaped (a zombie is not). No file I/O: this runs inside
    corral's callbacks, where blockbuster forbids blocking calls."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def raised_at_once(call: Coroutine[Any, Any, Any]) -> BaseException | None:
    """Run ``call`` up to the first point where it would wait for anything; it must have
    ended there, with an error (returned; None if it returned a value). A call that waits
    (for memory, a slot, a timer) fails the test instead: "at once" without a clock."""
    try:
        call.send(None)
    except StopIteration:
        return None
    except BaseException as exc:
        return exc
    call.close()
    pytest.fail("the call waited instead of being refused at once")


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: Recorder[logging.LogRecord] = Recorder()

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is threading.main_thread():
            self.records.add(record)


@pytest.fixture
def corral_log() -> Iterator[Recorder[logging.LogRecord]]:
    """Every record of the ``corral`` logger, as it is emitted."""
    logger = logging.getLogger("corral")
    handler = LogRecorder()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def logged(
    message: str, *, tenant: str | None = None, reason: str | None = None
) -> Callable[[logging.LogRecord], bool]:
    def match(record: logging.LogRecord) -> bool:
        return (
            record.getMessage().startswith(message)
            and (tenant is None or getattr(record, "tenant", None) == tenant)
            and (reason is None or getattr(record, "reason", None) == reason)
        )

    return match


async def pid_of(sup: Supervisor, tenant: str) -> int:
    return int((await sup.call(tenant, "whoami"))["pid"])


async def sample_trees(roots: Sequence[int]) -> MemorySample:
    """One real ProcTreeProbe sample, off the event loop (on a probe thread of its own)."""
    probe = ProbeThread(ProcTreeProbe())
    try:
        return await probe.sample(roots)
    finally:
        await probe.aclose()


class SeeingProbe(ProcTreeProbe):
    """The real probe; it also notes when each sample was taken (monotonic, at its end) and
    what it saw. A decision logged after a sample ended was made on that sample or an
    earlier one: the sampler takes the next only once it has acted on the last."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[int, int]]] = []

    def sample(self, roots: Sequence[int], exclude_roots: bool = False) -> MemorySample:
        result = super().sample(roots, exclude_roots)
        self.samples.append((time.monotonic(), dict(result.trees)))
        return result

    def with_cgroups(self, sample: MemorySample, cgroups: Mapping[int, str]) -> MemorySample:
        result = super().with_cgroups(sample, cgroups)
        self.samples[-1] = (time.monotonic(), dict(result.trees))  # what the sampler acts on
        return result


async def start_or_skip(sup: Supervisor, method: str) -> None:
    """Start ``sup``; skip the test if it asked for cgroups and the host has none (not root)."""
    try:
        await sup.start()
    except corral.StartError as exc:
        if method == "cgroup" and "no memory cgroup can be used" in str(exc):
            pytest.skip(f"memory cgroups are unavailable on this host: {exc}")
        raise


def check_enforcement(sup: Supervisor, method: str) -> None:
    enforcement = sup.stats().memory_enforcement
    if method == "cgroup":
        assert enforcement.startswith("cgroup v1 memory ("), enforcement
    else:
        assert enforcement.startswith("rlimit (RLIMIT_DATA)"), enforcement


def cgroup_dir(enforcement: str) -> str | None:
    found = re.search(r"\((/sys/fs/cgroup/[^)]+)\)", enforcement)
    return found.group(1) if found else None


# -- 1. soft limit: a kernel that leaks across calls (real allocation) -------------------------


@pytest.mark.slow
async def test_soft_limit_replaces_a_leaking_worker_once_its_calls_in_flight_complete(
    corral_log: Recorder[logging.LogRecord],
) -> None:
    limit, interval, step = 150 * MiB, 0.1, 40
    events = Events()
    probe = SeeingProbe()
    async with Supervisor(
        K,
        worker_memory_limit=limit,
        memory_check_interval=interval,
        probe=probe,
        on_event=events,
        drain_timeout=None,  # a condemned worker drains until its call is released
        **FAST,
    ) as sup:
        stats = sup.stats()
        assert stats.memory_enforcement == "none"  # no hard limit
        assert stats.memory_baseline is not None and 5 * MiB <= stats.memory_baseline <= 200 * MiB
        pid = await pid_of(sup, "leaky")
        # Grow the leak to just below the limit with hog(40) (hog(16) where 40 would land
        # too near the limit to say which call crosses); the next hog(40) crosses for sure.
        for _ in range(12):
            rss = (await sample_trees([pid])).trees[pid]
            if rss + step * MiB > limit + 8 * MiB:
                break
            await sup.call("leaky", "hog", step if rss + (step + 8) * MiB < limit else 16)
        else:
            pytest.fail(f"the worker never came near the limit (tree RSS {rss / MiB:.0f} MiB)")
        assert sup.stats().stops == {}
        assert not any(
            logged("worker over worker_memory_limit")(record) for _, record in corral_log.seen
        )

        # The call that crosses, with a call in flight on the same worker: it waits for a
        # signal, so it is still in flight when the worker is condemned, however slow the host.
        in_flight = asyncio.create_task(sup.call("leaky", "hold_until_signal", "gate"))
        assert await sup.call("leaky", "wait_entered", "gate") is True
        assert worker_info(sup, "leaky").in_flight == 1
        total = await sup.call("leaky", "hog", step)
        crossed = time.monotonic()

        decided, record = await corral_log.first(
            logged("worker over worker_memory_limit", tenant="leaky", reason="memory_limit")
        )
        assert record.levelno == logging.WARNING and "over worker_memory_limit" in record.msg
        # Condemned at the first sample that saw it over the limit (not a later one).
        over = [at for at, trees in probe.samples if at < decided and trees.get(pid, 0) > limit]
        assert len(over) == 1, [(at - crossed, trees) for at, trees in probe.samples]
        # Its call in flight runs on: the worker drains, it is not stopped yet.
        assert not in_flight.done()
        assert [(w.tenant, w.state) for w in sup.stats().workers] == [("leaky", "draining")]
        assert events.stopped() == []
        os.kill(pid, signal.SIGUSR1)
        assert await in_flight == "released gate"
        released = time.monotonic()
        stop_at, event = await events.first(stopped("leaky"))
        assert (event.reason, event.rung, event.returncode, event.pid) == (
            "memory_limit",
            "ask",
            0,
            pid,
        )
        await corral_log.first(logged("worker stopped", tenant="leaky", reason="memory_limit"))
        print(
            f"\nsoft limit: leaked {total / MiB:.0f} MiB; decision {decided - crossed:+.3f}s after "
            f"the crossing call returned; stopped {stop_at - released:.3f}s after its last call "
            "completed"
        )
        new_pid = await pid_of(sup, "leaky")
        assert new_pid != pid and pid_gone(pid)
        assert sup.stats().stops == {"memory_limit": 1}
        assert await sup.call("leaky", "hog", 0) == 0  # a fresh worker: the leak is gone


# -- 2. hard limit: a memory bomb in one call (real allocation) --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cgroup", "rlimit"])
async def test_hard_limit_stops_a_memory_bomb_and_spares_the_host_and_other_tenants(
    method: str, corral_log: Recorder[logging.LogRecord]
) -> None:
    events = Events()
    sup = Supervisor(
        K,
        worker_memory_hard_limit=HARD_LIMIT,
        memory_method=method,  # type: ignore[arg-type]
        on_event=events,
        **FAST,
    )
    await start_or_skip(sup, method)
    try:
        check_enforcement(sup, method)
        cgroups = cgroup_dir(sup.stats().memory_enforcement)
        assert (cgroups is not None) == (method == "cgroup")
        assert cgroups is None or os.path.isdir(cgroups)  # noqa: ASYNC240 (one stat of sysfs)
        baseline = sup.stats().memory_baseline
        assert baseline is not None and 5 * MiB <= baseline <= 200 * MiB
        other = await pid_of(sup, "other")
        bomb_pid = await pid_of(sup, "bomb")
        # What the worker had before the bomb: rlimit counts its data segment, a cgroup what
        # it has touched (at most its RSS) against the limit; the bomb gets the rest.
        before = psutil.Process(bomb_pid).memory_info()
        had = before.data if method == "rlimit" else before.rss

        bombed = asyncio.Event()

        async def keep_asking() -> int:
            answers = 0
            while not bombed.is_set():
                assert await sup.call("other", "echo", answers) == answers
                answers += 1
            return answers

        pinger = asyncio.create_task(keep_asking())
        started = time.monotonic()
        with pytest.raises(corral.MemoryLimitError) as err:
            try:
                async with asyncio.timeout(30):  # a hang guard: the bomb stops in a second
                    await sup.call("bomb", "bomb", BOMB_STEP_MB, report=True)
            finally:
                bombed.set()
        took = time.monotonic() - started
        # Its first call was sent before the bomb's reply could be read, and it counts it.
        answers = await pinger
        assert "memory" in str(err.value) and "256 MiB" in str(err.value), str(err.value)
        assert (err.value.tenant, err.value.pid, err.value.limit) == ("bomb", bomb_pid, HARD_LIMIT)
        assert answers >= 1  # the other tenant answered while the bomb went off

        _, event = await events.first(stopped("bomb"))
        # The worker's output is logged before its stop is reported: every line it wrote
        # is in, and the last says how much the bomb held when the OS stopped it.
        held = [
            int(found.group(1))
            for _, record in corral_log.seen
            if getattr(record, "pid", None) == bomb_pid
            and (found := re.fullmatch(r"\[bomb\] bomb holds (\d+) MiB", record.getMessage()))
        ]
        bombed_mb = max(held, default=0)
        print(
            f"\nhard limit ({method}): bomb stopped after {took:.3f}s holding {bombed_mb} MiB "
            f"(the worker had {had / MiB:.0f} MiB before); {answers} calls to another tenant "
            f"meanwhile; baseline {baseline / MiB:.1f} MiB"
        )
        # Spared the host: the bomb held no more than the limit allows (uncontained, it would
        # have gone on to 4 GiB) ...
        assert bombed_mb * MiB <= HARD_LIMIT
        # ... and it did go off: the OS stopped it only once the limit was nearly used up
        # (what the worker had, the step it was stopped in, and the interpreter's own
        # allocations on the way, at most another step, are the rest).
        assert bombed_mb * MiB >= HARD_LIMIT - had - 2 * BOMB_STEP_MB * MiB, held
        assert event.reason == "memory_hard_limit" and event.pid == bomb_pid
        if method == "cgroup":
            assert event.returncode == -signal.SIGKILL  # the OOM killer, inside its cgroup
        else:
            assert (event.rung, event.returncode) == ("ask", 0)  # MemoryError, then drained
        assert sup.stats().stops == {"memory_hard_limit": 1}
        assert await pid_of(sup, "other") == other  # still the same worker, still answering
        assert await pid_of(sup, "bomb") != bomb_pid  # replaced on the next call
    finally:
        await sup.aclose()
    if cgroups is not None:
        assert not os.path.exists(cgroups), f"{cgroups} left behind"  # noqa: ASYNC240


# -- 3. threads under the hard limit -----------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "cgroup",
        pytest.param("rlimit"),
    ],
)
async def test_a_threaded_kernel_works_under_the_hard_limit(method: str) -> None:
    sup = Supervisor(
        K,
        worker_memory_hard_limit=HARD_LIMIT,
        memory_method=method,  # type: ignore[arg-type]
        **FAST,
    )
    await start_or_skip(sup, method)
    try:
        check_enforcement(sup, method)
        async with asyncio.timeout(30):
            result = await sup.call("t", "many_threads", 50)
        print(f"\nthreads under a 256 MiB hard limit ({method}): {result}")
        assert result == {"started": 50, "finished": 50, "error": None}
    finally:
        await sup.aclose()


# -- 4. pressure, with a fake probe ------------------------------------------------------------


class FakeProbe:
    """A ProcessProbe with chosen numbers: a tree weighs ``sizes.get(pid, default)`` and the
    host has ``available`` of ``total``. Counts samples, for tests that await rounds."""

    def __init__(self) -> None:
        self.total = 24 * GiB
        self.available = 20 * GiB
        self.default = 50 * MiB
        self.sizes: dict[int, int] = {}
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._ticked = asyncio.Event()

    def sample(self, roots: Sequence[int], exclude_roots: bool = False) -> MemorySample:
        result = MemorySample(
            {pid: self.sizes.get(pid, self.default) for pid in roots}, self.available, self.total
        )
        self._loop.call_soon_threadsafe(self._tick)  # runs before the sampler sees the result
        return result

    def _tick(self) -> None:
        self.count += 1
        self._ticked.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until ``condition()`` holds, checked after each round (what the rounds
        act on changes only then)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._ticked.clear()
                await self._ticked.wait()

    async def rounds(self, n: int = 3, timeout: float = 30.0) -> None:
        """Wait until a round that read the numbers as they are now has been acted on: the
        sample in progress may have read the old ones; the next is acted on before the third."""
        target = self.count + n
        async with asyncio.timeout(timeout):
            while self.count < target:
                self._ticked.clear()
                await self._ticked.wait()


@dataclass
class Pressure:
    options: dict[str, Any]
    reason: str
    describes: str
    apply: Callable[[FakeProbe], None]
    clear: Callable[[FakeProbe], None]
    hold: Callable[[FakeProbe], None] | None = None  # within the hysteresis: pressure stays
    floor: int = field(default=0)


def _host(min_available: float, floor: int) -> Pressure:
    def set_available(value: float) -> Callable[[FakeProbe], None]:
        return lambda probe: setattr(probe, "available", int(value))

    return Pressure(
        options={"min_available_memory": min_available},
        reason="host_pressure",
        describes=f"is below {floor / MiB:.0f} MiB",
        apply=set_available(GiB),
        hold=set_available(floor * 1.02),  # above the floor, within 5% of it: still on
        clear=set_available(floor * 1.06),
        floor=floor,
    )


def _total() -> Pressure:
    def apply(probe: FakeProbe) -> None:
        probe.default = 2 * GiB  # any one worker is over max_total_memory

    def clear(probe: FakeProbe) -> None:
        probe.default = 50 * MiB

    return Pressure(
        options={"max_total_memory": GiB},
        reason="total_memory",
        describes="together, over max_total_memory 1024 MiB",
        apply=apply,
        clear=clear,
    )


PRESSURES = {
    "min_available_bytes": _host(2 * GiB, 2 * GiB),
    "min_available_fraction": _host(0.1, int(0.1 * 24 * GiB)),
    "max_total": _total(),
}


@pytest.mark.parametrize("name", list(PRESSURES))
async def test_pressure_stops_idle_workers_lru_first_one_at_a_time_and_refuses_new_ones(
    name: str, corral_log: Recorder[logging.LogRecord]
) -> None:
    pressure = PRESSURES[name]
    interval = 0.05
    probe = FakeProbe()
    events = Events()
    async with Supervisor(
        K,
        max_workers=8,
        idle_ttl=None,
        memory_check_interval=interval,
        probe=probe,
        on_event=events,
        **pressure.options,
        **FAST,
    ) as sup:
        events.sup = sup
        pids = {t: await pid_of(sup, t) for t in ("a", "b", "c")}
        held = asyncio.create_task(sup.call("d", "hold_until_signal", "g"))
        assert await sup.call("d", "wait_entered", "g") is True
        pids["d"] = await pid_of(sup, "d")
        await sup.call("b", "echo", 1)  # idle, least recently used first: a, c, b
        await probe.rounds()
        assert sup.stats().memory_pressure is None and sup.stats().stops == {}
        assert {w.rss for w in sup.stats().workers} == {probe.default}  # the sampled sizes
        starts = sup.stats().starts
        assert starts == 4

        async def refused() -> corral.MemoryPressureError:
            error = raised_at_once(sup.call("new", "echo", 1))  # not waiting for memory
            assert isinstance(error, corral.MemoryPressureError), error
            assert error.reason == pressure.reason and error.retry_after == interval
            assert sup.stats().starts == starts and "new" not in sup
            return error

        pressure.apply(probe)
        await events.first(stopped("a"))
        err = await refused()
        detail = sup.stats().memory_pressure
        assert detail is not None and pressure.describes in detail and detail in str(err)
        await corral_log.first(logged("memory pressure reason=", reason=pressure.reason))

        # The idle ones go first, then the busy one is drained, not killed.
        await corral_log.first(logged("worker draining", tenant="d", reason=pressure.reason))
        assert not held.done()
        assert [(w.tenant, w.state) for w in sup.stats().workers] == [("d", "draining")]
        await refused()
        os.kill(pids["d"], signal.SIGUSR1)
        async with asyncio.timeout(30):
            assert await held == "released g"
        _, last = await events.first(stopped("d"))
        assert (last.rung, last.returncode) == ("ask", 0)

        assert events.stopped() == [(t, pressure.reason) for t in ("a", "c", "b", "d")]
        for tenant, others in events.states_at_stop.items():
            # when one stop ends, no other has begun: the rest are still serving
            assert set(others.values()) <= {"ready", "busy"}, (tenant, others)
            assert events.reaped_at_stop[tenant], f"{tenant} was reported stopped before reaped"
        assert sup.stats().stops == {pressure.reason: 4}

        if pressure.hold is not None:
            pressure.hold(probe)
            await probe.rounds()
            assert sup.stats().memory_pressure is not None  # the hysteresis keeps it on
            await refused()
        pressure.clear(probe)
        await probe.rounds()
        assert sup.stats().memory_pressure is None
        assert await sup.call("new", "echo", 1) == 1  # new workers start again
        assert sup.stats().starts == starts + 1
        await corral_log.first(logged("memory pressure is over"))


@pytest.mark.timeout(180)
async def test_pressure_chooses_the_next_victim_only_once_the_last_is_reaped() -> None:
    """A victim slower to go than a sampling interval (its shutdown() hook is held until
    the test sends SIGUSR1) stays the only worker stopping for as many rounds as it takes:
    sampling goes on meanwhile, but no round stops another worker (invariant 9).

    Every worker started is released in ``finally`` (all the pids the ``ready`` events
    gave, but those already seen stopped), so a failure anywhere ends the close at once
    and is reported as itself; a worker missed even so is escalated past ASK after
    ``shutdown_timeout`` (well inside the test's timeout; each victim is held for a few
    rounds only, far less)."""
    probe = FakeProbe()
    events = Events()

    def state(tenant: str) -> str | None:
        return next((w.state for w in sup.stats().workers if w.tenant == tenant), None)

    async with Supervisor(
        "tests.supervisor.stop_kernels:held_stop",
        max_workers=4,
        idle_ttl=None,
        min_available_memory=2 * GiB,
        memory_check_interval=0.01,
        probe=probe,
        on_event=events,
        shutdown_timeout=45.0,  # beyond any hold in the test; a missed release ends in TERM
        term_timeout=2.0,
        start_timeout=60.0,
        call_timeout=60.0,
    ) as sup:
        events.sup = sup
        try:
            pids = {t: await sup.call(t, "pid") for t in ("a", "b", "c")}
            await sup.call("b", "pid")  # idle, least recently used first: a, c, b
            await probe.rounds(timeout=60)
            assert sup.stats().memory_pressure is None

            probe.available = GiB
            for victim in ("a", "c", "b"):
                await probe.until(lambda v=victim: state(v) == "stopping", timeout=60)
                await probe.rounds(10, timeout=60)  # rounds acted on while the stop is held
                assert sup.stats().memory_pressure is not None
                states = {w.tenant: w.state for w in sup.stats().workers}
                assert states.pop(victim) == "stopping", (victim, states)
                assert set(states.values()) <= {"ready"}, (victim, states)
                os.kill(pids[victim], signal.SIGUSR1)
                _, event = await events.first(stopped(victim), timeout=60)
                assert (event.reason, event.rung, event.returncode) == ("host_pressure", "ask", 0)
        finally:  # let the close go as fast as the stops it waits for, whatever failed
            release(events)
        assert events.stopped() == [(t, "host_pressure") for t in ("a", "c", "b")]
        for tenant, others in events.states_at_stop.items():
            assert set(others.values()) <= {"ready"}, (tenant, others)

        probe.available = 20 * GiB
        await probe.rounds(timeout=60)
        assert sup.stats().memory_pressure is None


def release(events: Events) -> None:
    """SIGUSR1 to every worker the events saw ready and not yet stopped (a stopped one's
    pid may be another process's by now). One that is gone already is skipped."""
    started = {e.pid for _, e in events.seen if e.kind == "ready" and e.pid is not None}
    gone = {e.pid for _, e in events.seen if e.kind == "stopped"}
    for pid in sorted(started - gone):
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


async def test_pressure_can_end_while_a_busy_worker_drains(
    corral_log: Recorder[logging.LogRecord],
) -> None:
    probe = FakeProbe()
    async with Supervisor(
        K,
        min_available_memory=2 * GiB,
        memory_check_interval=0.05,
        probe=probe,
        drain_timeout=None,  # d drains until its call is released: sampling must go on
        **FAST,
    ) as sup:
        held = asyncio.create_task(sup.call("d", "hold_until_signal", "g"))
        assert await sup.call("d", "wait_entered", "g") is True
        pid = await pid_of(sup, "d")
        try:
            probe.available = GiB
            await corral_log.first(logged("worker draining", tenant="d"))
            probe.available = 20 * GiB  # the pressure is over; d's call runs on
            await probe.rounds(timeout=30)  # rounds are taken (and acted on) while d drains
            assert not held.done() and sup.stats().workers[0].state == "draining"
            assert sup.stats().memory_pressure is None
            assert await sup.call("new", "echo", 1) == 1
        finally:
            os.kill(pid, signal.SIGUSR1)
            async with asyncio.timeout(30):
                assert await held == "released g"


# -- 5. real host pressure ---------------------------------------------------------------------


async def test_a_call_right_after_start_under_real_host_pressure_starts_no_worker() -> None:
    events = Events()
    async with Supervisor(
        K, min_available_memory=0.999, memory_check_interval=0.1, on_event=events, **FAST
    ) as sup:
        try:
            async with asyncio.timeout(30):  # a hang guard
                await sup.call("t", "echo", 1)
        except corral.MemoryPressureError:
            refused = True
        else:
            refused = False
        assert (refused, sup.stats().starts, events.seen) == (True, 0, [])


async def test_real_host_pressure_refuses_new_workers_without_hanging() -> None:
    # 99.9% of the host must stay available: more than this host ever has.
    events = Events()
    loop = asyncio.get_running_loop()
    async with Supervisor(
        K, min_available_memory=0.999, memory_check_interval=0.1, on_event=events, **FAST
    ) as sup:
        # The first sample has no event of its own.
        async with asyncio.timeout(30):
            while sup.stats().memory_pressure is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # ok-sleep: polling for the first sample, deadline above
        asked = loop.time()
        with pytest.raises(corral.MemoryPressureError) as err:
            async with asyncio.timeout(30):  # a hang guard
                await sup.call("t", "echo", 1)
        took = loop.time() - asked
        print(f"\nreal host pressure: refused after {took * 1000:.1f} ms: {err.value}")
        assert err.value.reason == "host_pressure" and "host memory available" in str(err.value)
        assert sup.stats().starts == 0 and events.seen == [] and "t" not in sup


# -- 6. the baseline check at start ------------------------------------------------------------


@pytest.mark.parametrize("option", ["worker_memory_limit", "worker_memory_hard_limit"])
async def test_limits_at_or_below_a_fresh_workers_baseline_are_refused_at_start(
    option: str,
) -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    sup = supervisor(**{option: 4 * MiB})
    async with asyncio.timeout(20):
        with pytest.raises(ValueError, match=f"{option}=.*baseline") as err:
            async with sup:
                pytest.fail("started with a limit below the baseline")
    assert "4 MiB" in str(err.value)
    assert sup.stats().state == "closed"
    baseline = sup.stats().memory_baseline
    assert baseline is not None and 4 * MiB < baseline <= 200 * MiB
    left = [p.pid for p in me.children(recursive=True) if p.pid not in before]
    assert left == [], f"processes left behind: {left}"
    with pytest.raises(corral.SupervisorClosedError):
        await sup.start()


# -- 7. option checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"worker_memory_limit": 200 * MiB, "worker_memory_hard_limit": 100 * MiB}, "below"),
        ({"worker_memory_limit": 100 * MiB, "worker_memory_hard_limit": 100 * MiB}, "below"),
        ({"min_available_memory": 0}, "min_available_memory"),
        ({"min_available_memory": 0.0}, "min_available_memory"),
        ({"min_available_memory": 1.0}, "min_available_memory"),
        ({"min_available_memory": -5}, "min_available_memory"),
        ({"min_available_memory": 1.5}, "min_available_memory"),
        ({"min_available_memory": MiB - 1}, "min_available_memory"),
        ({"memory_method": "bogus"}, "memory_method"),
        ({"worker_memory_limit": MiB - 1}, "worker_memory_limit"),
        ({"worker_memory_hard_limit": MiB - 1}, "worker_memory_hard_limit"),
        ({"max_total_memory": MiB - 1}, "max_total_memory"),
        ({"worker_memory_limit": True}, "worker_memory_limit"),
        ({"memory_check_interval": 0}, "memory_check_interval"),
    ],
)
def test_bad_memory_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor(K, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"min_available_memory": 0.2},
        {"min_available_memory": 512 * MiB},
        {"worker_memory_limit": MiB, "worker_memory_hard_limit": MiB + 1},
        {"max_total_memory": MiB, "memory_method": "rlimit"},
        {"worker_memory_hard_limit": GiB, "memory_method": "cgroup"},
    ],
)
def test_good_memory_options_are_accepted(options: dict[str, Any]) -> None:
    sup = Supervisor(K, **options)
    assert sup.stats().state == "new"


# -- 8. measurement ----------------------------------------------------------------------------


class _TimedProbe(ProcTreeProbe):
    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def sample(self, roots: Sequence[int], exclude_roots: bool = False) -> MemorySample:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return super().sample(roots)
        finally:
            self.wall, self.cpu = time.perf_counter() - wall, time.thread_time() - cpu


async def test_the_probe_sums_a_workers_whole_tree_and_omits_gone_pids() -> None:
    async with supervisor() as sup:
        pid = await pid_of(sup, "t")
        child = await sup.call("t", "start_child")
        assert psutil.Process(child).ppid() == pid
        timed = _TimedProbe()
        probe = ProbeThread(timed)
        # Measured before the sample: the child may still be starting (its RSS only grows).
        own = psutil.Process(pid).memory_info().rss
        child_rss = psutil.Process(child).memory_info().rss
        try:
            sample = await probe.sample([pid])
        finally:
            await probe.aclose()
        assert sample.trees[pid] >= own + child_rss // 2  # the child's memory is in the sum
        assert 0 < sample.available <= sample.total == psutil.virtual_memory().total
        processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
        print(
            f"\nProcTreeProbe.sample(): {timed.wall * 1000:.2f} ms wall, {timed.cpu * 1000:.2f} ms "
            f"CPU, {processes} processes in /proc; worker tree {sample.trees[pid] / MiB:.1f} MiB "
            f"(worker {own / MiB:.1f} MiB + child {child_rss / MiB:.1f} MiB)"
        )
    # SIGKILLed before aclose() returned; gone once the kernel has delivered it.
    await wait_pid_gone(pid)
    await wait_pid_gone(child)
    gone = await sample_trees([pid, child, os.getpid()])
    assert set(gone.trees) == {os.getpid()}


# -- 9. the policy, pure -----------------------------------------------------------------------


def _sample(trees: dict[int, int] | None = None, available: int = 20 * GiB) -> MemorySample:
    return MemorySample(trees or {}, available, 24 * GiB)


def test_policy_over_soft_limit() -> None:
    sample = _sample({1: 99 * MiB, 2: 100 * MiB, 3: 101 * MiB, 4: 4 * GiB})
    policy = MemoryPolicy(soft_limit=100 * MiB, min_available=None, max_total=None)
    assert policy.over_soft_limit(sample) == [3, 4]  # strictly above
    assert policy.over_soft_limit(_sample()) == []
    none = MemoryPolicy(soft_limit=None, min_available=None, max_total=None)
    assert none.over_soft_limit(sample) == [] and not none.watches_pressure
    assert none.update_pressure(sample) is None


def test_policy_host_pressure_has_hysteresis() -> None:
    floor = 2 * GiB
    policy = MemoryPolicy(soft_limit=None, min_available=floor, max_total=None)
    assert policy.watches_pressure and policy.available_floor(24 * GiB) == floor
    steps = [
        (floor + 1, None),  # above the floor: no pressure
        (floor - 1, StopReason.HOST_PRESSURE),  # below: on
        (floor + 1, StopReason.HOST_PRESSURE),  # above, but within 5%: stays on
        (int(floor * 1.049), StopReason.HOST_PRESSURE),
        (int(floor * 1.051), None),  # clear of the hysteresis: off
        (int(floor * 1.02), None),  # within 5% again, but it was off: stays off
        (floor - 1, StopReason.HOST_PRESSURE),
    ]
    seen = [
        (available, policy.update_pressure(_sample(available=available))) for available, _ in steps
    ]
    assert seen == steps
    assert policy.pressure is StopReason.HOST_PRESSURE


def test_policy_fraction_floor() -> None:
    policy = MemoryPolicy(soft_limit=None, min_available=0.25, max_total=None)
    assert policy.available_floor(24 * GiB) == 6 * GiB
    assert policy.update_pressure(_sample(available=6 * GiB + 1)) is None
    assert policy.update_pressure(_sample(available=6 * GiB - 1)) is StopReason.HOST_PRESSURE
    assert policy.describe(_sample(available=5 * GiB)) == (
        "host memory available 5120 MiB is below 6144 MiB"
    )
    assert policy.update_pressure(_sample(available=int(6.31 * GiB))) is None
    assert policy.describe(_sample()) == "no memory pressure"


def test_policy_max_total_has_hysteresis() -> None:
    policy = MemoryPolicy(soft_limit=None, min_available=None, max_total=GiB)
    assert policy.available_floor(24 * GiB) is None and policy.watches_pressure
    half = GiB // 2
    assert policy.update_pressure(_sample({1: half, 2: half})) is None  # exactly at: fine
    assert policy.update_pressure(_sample({1: half, 2: half + 1})) is StopReason.TOTAL_MEMORY
    assert policy.describe(_sample({1: half, 2: GiB})) == (
        "workers use 1536 MiB together, over max_total_memory 1024 MiB"
    )
    assert policy.update_pressure(_sample({1: int(0.96 * GiB)})) is StopReason.TOTAL_MEMORY
    assert policy.update_pressure(_sample({1: int(0.95 * GiB)})) is None
    assert policy.update_pressure(_sample({1: int(0.99 * GiB)})) is None  # off stays off
    assert policy.update_pressure(_sample({})) is None


def test_policy_host_pressure_wins_over_total() -> None:
    policy = MemoryPolicy(soft_limit=None, min_available=2 * GiB, max_total=GiB)
    both = _sample({1: 2 * GiB}, available=GiB)
    assert policy.update_pressure(both) is StopReason.HOST_PRESSURE
    assert policy.describe(both).startswith("host memory available")
    only_total = _sample({1: 2 * GiB})
    assert policy.update_pressure(only_total) is StopReason.TOTAL_MEMORY
    assert policy.describe(only_total).startswith("workers use 2048 MiB")
