"""Soak and churn: thousands of worker start/evict cycles and many calls through one
supervisor, checking that the host process does not grow: open fds, OS threads, asyncio
tasks and RSS, sampled during the run and compared after ``aclose()`` with before.

Short by default (CI, about 20 s); ``CORRAL_SOAK=long`` runs 5,000 cycles and 300,000 calls.

Each cycle starts a tenant's worker, calls it, evicts it (every other cycle with a call
in flight, which must drain and succeed) and checks the process is gone when ``evict()``
returns. Meanwhile callers hammer a fixed set of warm tenants; every result is checked
for its tenant, request id and nonce. At the end the counts must add up exactly: one
start per cycle plus one per warm tenant (a warm worker that was restarted, or a cycle
that started two workers, shows up here), and one "evicted" stop per cycle.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

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
    make_lock_dir,
    overlap_options,
    table_problems,
    temporary_directory,
)
from tests.reliability.kernels import SYNC_PREFIX

LONG = os.environ.get("CORRAL_SOAK") == "long"
CYCLES = 5_000 if LONG else 600
CALLS = 300_000 if LONG else 40_000
LANES = 4  # start/evict cycles run in this many concurrent lanes
LANE_TENANTS = 10  # each lane cycles through this many tenants (each restarted many times)
# Half the tenants run a kernel of plain methods only (no event loop in their worker);
# their aecho calls go to the plain echo.
WARM_TENANTS = [f"warm-{i}" if i % 2 else f"{SYNC_PREFIX}warm-{i}" for i in range(8)]
CALLERS = 32
MAX_WORKERS = len(WARM_TENANTS) + LANES  # room for all: no LRU, so every stop is counted
DEADLINE = 30.0  # the test's own bound on any one operation; past it, it hangs
# The host's RSS may grow by this much from before the supervisor to after aclose(), and
# from the first quarter of the run to its end (allocator high-water marks, first-use
# caches); a leak of even 100 bytes per call or 10 KiB per cycle would exceed it in the
# long run.
RSS_BOUND = 8 * MiB
# While running, each worker holds four fds in the host (requests, replies, log, and a
# pidfd the launcher keeps until it is reaped), the warden a socket and a pidfd; the
# test's AnswerWatch its pidfds (counted apart).
FD_HEADROOM = 4 * MAX_WORKERS + 8
TASK_HEADROOM = CALLERS + LANES + 2 * MAX_WORKERS + 8  # callers, lanes, starts and stops

pytestmark = pytest.mark.timeout(3600 if LONG else 180)
scratch_fixture = pytest.fixture(temporary_directory, name="scratch")


def lane_tenant(lane: int, index: int) -> str:
    """Odd lanes cycle tenants with plain-method kernels."""
    return f"{SYNC_PREFIX if lane % 2 else ''}cycle-{lane}-{index}"


class Soak:
    """The cycling lanes, the callers, and what they checked."""

    def __init__(self, sup: Supervisor, watch: AnswerWatch, ledger: PidLedger) -> None:
        self.sup = sup
        self.watch = watch
        self.ledger = ledger
        self.reqs = itertools.count(1)
        self.cycles = 0
        self.calls = 0
        self.failures: list[str] = []
        self.samples: list[tuple[str, Resources, int]] = []  # (label, host, watch's fds)
        self._next_sample = 0.25

    async def _checked_call(self, tenant: str, method: str, **kwargs: Any) -> dict[str, Any]:
        if tenant.startswith(SYNC_PREFIX) and method == "aecho":
            method, kwargs = "echo", {}
        req, nonce = next(self.reqs), secrets.token_hex(8)
        async with asyncio.timeout(DEADLINE):
            value = await self.sup.call(tenant, method, req, nonce, **kwargs)
        expected = {"tenant": tenant, "req": req, "nonce": nonce, "overlap": False}
        if not isinstance(value, dict) or {k: value.get(k) for k in expected} != expected:
            self.failures.append(f"call {req} to {tenant} (nonce {nonce}) got {value!r}")
            return {}
        self.watch.answered(tenant, value["pid"])
        return value

    async def lane(self, lane: int, cycles: int) -> None:
        for i in range(cycles):
            tenant = lane_tenant(lane, i % LANE_TENANTS)
            async with asyncio.timeout(DEADLINE):
                info = await self.sup.get_or_create(tenant)
            pid = info.pid
            self.ledger.saw(pid)
            answer = await self._checked_call(tenant, "echo")
            if answer and answer["pid"] != pid:
                self.failures.append(f"{tenant}: started pid {pid}, answered from {answer}")
            in_flight = None
            if i % 2:  # evict with a call in flight: it drains, the call succeeds
                in_flight = asyncio.ensure_future(self._checked_call(tenant, "aecho", delay=0.005))
                await asyncio.sleep(0)  # ok-sleep: one loop turn, so that the call is sent
            async with asyncio.timeout(DEADLINE):
                evicted = await self.sup.evict(tenant)
            if in_flight is not None:
                drained = await in_flight  # answered by the worker being evicted
                if drained and drained["pid"] != pid:
                    self.failures.append(f"{tenant}: drained call answered by {drained}")
            if not evicted or tenant in self.sup or pid is None or not pid_gone(pid):
                self.failures.append(f"{tenant}: evict() -> {evicted}, pid {pid} still there")
            self.cycles += 1
            self._progress()

    async def caller(self, rng: random.Random, calls: int) -> None:
        for _ in range(calls):
            tenant = rng.choice(WARM_TENANTS)
            if rng.random() < 0.5:
                await self._checked_call(tenant, "echo")
            else:
                await self._checked_call(tenant, "aecho", delay=rng.choice((0.0, 0.0, 0.001)))
            self.calls += 1
            if self.calls % 1000 == 0:
                self._progress()

    def _progress(self) -> None:
        """Sample the host's resources at each quarter of the run, and check the table."""
        done = min(self.cycles / CYCLES, self.calls / CALLS)
        if done >= self._next_sample:
            self.samples.append((f"{done:.0%}", Resources.now(), self.watch.open_fds))
            self._next_sample += 0.25
            self.failures.extend(table_problems(self.sup))


async def test_soak_start_evict_cycles_and_calls_leak_nothing(scratch: Path) -> None:
    tenants = WARM_TENANTS + [lane_tenant(a, b) for a in range(LANES) for b in range(LANE_TENANTS)]
    options = {
        "max_workers": MAX_WORKERS,
        "idle_ttl": None,
        "shutdown_timeout": 2.0,
        "term_timeout": 1.0,
        **overlap_options(make_lock_dir(scratch, tenants)),
    }
    async with Supervisor(KERNEL, **options) as warm:  # first-use imports and caches
        await warm.call(WARM_TENANTS[0], "echo", 0, "warm")
    procs_before, threads_before = descendants(), set(threading.enumerate())
    before = Resources.now()

    watch, ledger = AnswerWatch(), PidLedger()
    with CorralLogs.attached() as logs, LoopErrors().installed() as loop_errors:
        async with Supervisor(KERNEL, **options) as sup:
            soak = Soak(sup, watch, ledger)
            for tenant in WARM_TENANTS:
                ledger.saw((await sup.get_or_create(tenant)).pid)
            began = time.monotonic()
            rng = random.Random(secrets.token_hex(4))
            lanes = [soak.lane(i, CYCLES // LANES + (i < CYCLES % LANES)) for i in range(LANES)]
            callers = [
                soak.caller(random.Random(rng.random()), CALLS // CALLERS + (i < CALLS % CALLERS))
                for i in range(CALLERS)
            ]

            async def timed(coros: list[Any]) -> float:
                await asyncio.gather(*coros)
                return time.monotonic() - began

            cycles_took, calls_took = await asyncio.gather(timed(lanes), timed(callers))
            stats = sup.stats()
            during = soak.samples[-1][1] if soak.samples else Resources.now()
        watch.close()
    after = Resources.now(settle=threads_before)
    leftovers = leftover_processes(procs_before)
    still_running = ledger.still_running()

    assert len(soak.samples) == 4, soak.samples
    first = soak.samples[0][1]
    leaks = after.leaks_since(before, RSS_BOUND)
    if during.rss - first.rss > RSS_BOUND:
        leaks.append(f"rss grew {(during.rss - first.rss) / MiB:.1f} MiB while running")
    for label, sample, watch_fds in soak.samples:
        if (
            sample.fds - watch_fds > before.fds + FD_HEADROOM
            or sample.threads > before.threads + 1  # the memory-probe thread
            or sample.tasks > before.tasks + TASK_HEADROOM
        ):
            leaks.append(f"at {label}: {sample.describe()} ({watch_fds} fds are the watch's)")
    print(
        f"\nsoak ({'long' if LONG else 'short'}): {soak.cycles} start/evict cycles in "
        f"{cycles_took:.1f}s ({soak.cycles / cycles_took:.0f} cycles/s, {LANES} lanes); "
        f"{soak.calls} calls in {calls_took:.1f}s ({soak.calls / calls_took:.0f} calls/s, "
        f"{CALLERS} callers over {len(WARM_TENANTS)} warm tenants), concurrently\n"
        f"  workers started {stats.starts}, stopped {stats.stops}\n"
        f"  host before:  {before.describe()}\n"
        + "".join(
            f"  at {label:>4}:     {sample.describe()} (of the fds, {watch_fds} are the "
            "test's pidfds)\n"
            for label, sample, watch_fds in soak.samples
        )
        + f"  after aclose: {after.describe()}\n"
        f"  leaks found: {len(leaks) + len(leftovers) + len(still_running)}; overlaps: "
        f"{len(logs.overlaps) + len(watch.violations)}; corral errors logged: "
        f"{len(logs.errors)}; failures: {len(soak.failures)}"
    )
    assert not soak.failures, soak.failures[:20]
    assert soak.cycles == CYCLES and soak.calls == CALLS
    assert stats.starts == CYCLES + len(WARM_TENANTS), stats
    assert stats.stops == {"evicted": CYCLES}, stats
    assert not watch.violations and not logs.overlaps, (watch.violations, logs.overlaps)
    assert not logs.errors, logs.errors[:20]
    assert not loop_errors.errors, loop_errors.errors[:20]
    assert not leftovers, f"processes left after aclose(): {leftovers}"
    assert not still_running, f"workers still running after aclose(): {still_running}"
    assert not leaks, leaks
