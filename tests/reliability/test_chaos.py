"""Chaos: many callers over many more tenants than worker slots, while workers are
SIGKILLed, SIGSTOPped and evicted from outside (and now and then the warden, their parent,
is SIGKILLed), and kernels crash, hang, raise and break the protocol from inside. Every
call must get exactly one outcome that its own fault, or a fault injected into the worker
it ran on, explains; nothing may hang; and after ``aclose()`` nothing may be left.

The default run takes about 30 s of chaos; ``CORRAL_CHAOS_SECONDS=600`` runs longer, and
``CORRAL_CHAOS_SEED`` replays a seed's choices (not its timing).

Which outcome each fault explains (``pid`` is the worker the call ran on, from the error;
a fault on ``pid`` counts only within FAULT_WINDOW of the error, as pids get reused):

=========================  =================================================================
outcome                    acceptable when
=========================  =================================================================
result                     an ``echo``/``aecho``/probe call; it names the caller's tenant,
                           request id and nonce, and its worker held the tenant's lock
``KernelError``            a ``fail`` call; the message names its tenant, request and nonce
``CallTimeoutError``       a ``hang``/``ahang`` call (its own timeout), or ``pid`` was
                           SIGSTOPped by the chaos task (in any state; a ready or busy one
                           also gets a probe call whose timeout must kill it)
``WorkerStoppedError``     reason ``timeout`` and ``pid`` had a call time out (another call's
                           timeout killed it); reason ``evicted`` and ``pid`` was evicted by
                           the chaos task (drain deadline)
``WorkerCrashedError``     SIGKILL and ``pid`` was SIGKILLed by the chaos task; exit code
                           ``CRASH_CODE`` and a ``crash`` call ran on ``pid``; "its warden
                           process died" and the warden was SIGKILLed just before
``ProtocolError``          a ``garbage`` call ran on ``pid``
``StartError``             ``pid`` was SIGKILLed, SIGSTOPped (start timeout) or evicted by
                           the chaos task while starting; or it names the warden, which was
                           SIGKILLed just before
anything else              never: ``BackoffError`` (restart_intensity is out of reach),
                           ``CapacityError``, ``SupervisorClosedError`` (every call ends
                           before ``aclose()``), ``InvalidCallError``, memory errors, or the
                           test's own deadline (a hang)
=========================  =================================================================

Every error must also name the tenant it was called for. Each SIGSTOPped worker must end
by being killed (see :meth:`StopLog.judge`), and no answer may come from a second live
worker of a tenant (the kernels' lock, :class:`AnswerWatch`, the live-process count).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from tests.reliability.kernels import SYNC_PREFIX

SECONDS = float(os.environ.get("CORRAL_CHAOS_SECONDS", "30"))
# A third of the tenants have a kernel of plain methods only (served without an event
# loop); their async kinds are sent to the plain twins (aecho -> echo, ahang -> hang).
TENANTS = [f"{SYNC_PREFIX}{i:03d}" if i % 3 == 1 else f"t{i:03d}" for i in range(120)]
HOT = TENANTS[:6]  # most calls go to these: warm workers with concurrent calls (2 sync)
PLAIN_TWIN = {"aecho": "echo", "ahang": "hang"}
HOT_SHARE = 0.8  # the rest go to any of the 120: constant LRU churn
MAX_WORKERS = 12
CALLERS = 40
CRASH_CODE = 42
HANG_TIMEOUT = 0.3  # per-call timeout of the hang/ahang faults
PROBE_TIMEOUT = 0.5  # per-call timeout of the call sent to each SIGSTOPped worker
CALL_TIMEOUT = 20.0  # everything else: never reached by a healthy call on a busy host
# The test's own deadline per call: pool_timeout + start_timeout + call_timeout + the time
# to stop an old worker, with room to spare. A call still pending then is a hang.
CALL_DEADLINE = 90.0
# A fault explains an error on the same pid only this close in time: pids are reused
# (pid_max may be 32768, and a long run starts tens of thousands of workers).
FAULT_WINDOW = CALL_DEADLINE
# Errors are judged once this old: the outcomes that explain them (a crash call's own
# error, a timed-out call) resolve in the same loop turn or the next few.
JUDGE_DELAY = 2.0
# The host's RSS may grow this much from before the supervisor started to after aclose()
# (allocator high-water marks, first-use caches; the test's own records are kept bounded).
# A leak per call, start or fault (tens of thousands of calls, hundreds of starts and
# faults per default run) would pass it.
RSS_BOUND = 8 * MiB
# The run goes on past SECONDS until this many workers were stopped by LRU (a busy host
# makes fewer calls per second; the churn must happen all the same).
LRU_CHURN = 100

KINDS = {"echo": 44, "aecho": 40, "fail": 6, "crash": 3, "hang": 2, "ahang": 2, "garbage": 3}
CHAOS_ACTIONS = {"sigkill": 40, "sigstop": 30, "evict": 30, "sigkill_warden": 3}
# Errors a warden's death explains come within this many seconds (more than start_timeout)
WARDEN_WINDOW = 30.0

pytestmark = pytest.mark.timeout(SECONDS + 8 * CALL_DEADLINE + 120)
scratch_fixture = pytest.fixture(temporary_directory, name="scratch")

OPTIONS: dict[str, Any] = {
    "max_workers": MAX_WORKERS,
    "idle_ttl": 1.0,
    "call_timeout": CALL_TIMEOUT,
    "start_timeout": 15.0,  # a SIGSTOPped start ends here; a healthy one, however slow, not
    "shutdown_timeout": 0.5,
    "term_timeout": 0.5,
    "drain_timeout": 1.0,
    "pool_timeout": 20.0,
    "restart_intensity": 1_000_000,  # no BackoffError: every fault gets a fresh worker
    "restart_period": 60.0,
}


@dataclass(frozen=True)
class _Error:
    """A call's error, kept small (no traceback) until it is judged."""

    at: float  # monotonic
    kind: str  # what the call was: a KINDS key or "probe"
    tenant: str
    type: type[corral.CorralError]
    pid: int | None
    reason: str | None  # WorkerStoppedError
    signal: int | None  # WorkerCrashedError
    exitcode: int | None  # WorkerCrashedError
    text: str

    @classmethod
    def of(cls, kind: str, tenant: str, exc: corral.CorralError) -> _Error:
        return cls(
            time.monotonic(),
            kind,
            tenant,
            type(exc),
            getattr(exc, "pid", None),
            getattr(exc, "reason", None),
            getattr(exc, "signal", None),
            getattr(exc, "exitcode", None),
            f"{type(exc).__name__}: {exc}"[:300],
        )


class Faults:
    """Which pid had which fault, and when (monotonic); a fault explains an error on that
    pid only within FAULT_WINDOW of it, so that a reused pid is not excused."""

    def __init__(self) -> None:
        self._at: dict[str, dict[int, float]] = defaultdict(dict)
        self._warden_kills: list[float] = []  # a few dozen at most: never pruned

    def note(self, kind: str, pid: int | None, at: float) -> None:
        if pid is not None:
            self._at[kind][pid] = at

    def explains(self, kind: str, pid: int | None, at: float) -> bool:
        when = self._at[kind].get(pid) if pid is not None else None
        return when is not None and abs(at - when) <= FAULT_WINDOW

    def prune(self, now: float) -> None:
        for pids in self._at.values():
            for pid in [p for p, at in pids.items() if now - at > 2 * FAULT_WINDOW]:
                del pids[pid]

    def warden_died(self, at: float) -> None:
        self._warden_kills.append(at)

    def near(self, at: float) -> str:
        """Where ``at`` falls among the recorded warden kills, for a failure's message."""
        kills = self._warden_kills  # in time order
        if not kills:
            return " [no warden kill recorded]"
        before = [at - when for when in kills if when <= at]
        after = [when - at for when in kills if when > at]
        last = f"{min(before):.2f}s after the last" if before else "before the first"
        nxt = f", {min(after):.2f}s before the next" if after else ""
        return f" [{last} of {len(kills)} warden kills{nxt}]"

    def warden_explains(self, at: float) -> bool:
        """A warden was killed at most WARDEN_WINDOW before ``at``: every worker it had,
        and every start in progress, failed with it."""
        return any(0 <= at - when <= WARDEN_WINDOW for when in self._warden_kills)


@dataclass
class Chaos:
    """The callers, the chaos task, the observer, and the books they keep."""

    sup: Supervisor
    watch: AnswerWatch
    ledger: PidLedger
    rng: random.Random
    stop_log: StopLog
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reqs: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    started: int = 0
    finished: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    faults: Faults = field(default_factory=Faults)
    pending: deque[_Error] = field(default_factory=deque)  # errors not judged yet
    explained: int = 0
    failures: list[str] = field(default_factory=list)
    helpers: set[asyncio.Task[None]] = field(default_factory=set)
    snapshots: int = 0
    max_live: int = 0

    # -- one call, accounted -------------------------------------------------------------------

    async def call(self, tenant: str, kind: str) -> None:
        req, nonce = next(self.reqs), secrets.token_hex(8)
        self.started += 1
        try:
            async with asyncio.timeout(CALL_DEADLINE):
                value = await self._send(tenant, kind, req, nonce)
        except corral.CorralError as exc:
            self._record(kind, type(exc).__name__)
            self._check_error(kind, tenant, req, nonce, exc)
        except TimeoutError:
            self._record(kind, "HANG")
            self.failures.append(f"{kind} call {req} to {tenant} pending after {CALL_DEADLINE}s")
        else:
            self._record(kind, "result")
            self._check_result(kind, tenant, req, nonce, value)

    def _record(self, kind: str, outcome: str) -> None:
        self.finished += 1
        self.outcomes[outcome] += 1
        self.by_kind[kind, outcome] += 1

    async def _send(self, tenant: str, kind: str, req: int, nonce: str) -> Any:
        sup = self.sup
        if tenant.startswith(SYNC_PREFIX):
            kind = PLAIN_TWIN.get(kind, kind)
        if kind == "echo":
            return await sup.call(tenant, "echo", req, nonce)
        if kind == "aecho":
            delay = self.rng.choice((0.0, 0.0, 0.001, 0.005, 0.02))
            return await sup.call(tenant, "aecho", req, nonce, delay=delay)
        if kind == "fail":
            return await sup.call(tenant, "fail", req, nonce)
        if kind == "crash":
            return await sup.call(tenant, "crash", CRASH_CODE)
        if kind in ("hang", "ahang"):
            return await sup.invoke(tenant, kind, timeout=HANG_TIMEOUT)
        if kind == "garbage":
            return await sup.call(tenant, "garbage")
        assert kind == "probe"
        return await sup.invoke(tenant, "echo", (req, nonce), timeout=PROBE_TIMEOUT)

    def _check_result(self, kind: str, tenant: str, req: int, nonce: str, value: Any) -> None:
        expected = {"tenant": tenant, "req": req, "nonce": nonce, "overlap": False}
        if kind not in ("echo", "aecho", "probe"):
            self.failures.append(f"{kind} call {req} to {tenant} returned {value!r}")
        elif not isinstance(value, dict) or {k: value.get(k) for k in expected} != expected:
            self.failures.append(f"call {req} to {tenant} (nonce {nonce}) got {value!r}")
        else:
            self.watch.answered(tenant, value["pid"])
            self.ledger.saw(value["pid"])

    def _check_error(
        self, kind: str, tenant: str, req: int, nonce: str, exc: corral.CorralError
    ) -> None:
        if isinstance(exc, corral.KernelError):
            message = f"{tenant}|{req}|{nonce}"
            if kind != "fail" or exc.remote_message != message or exc.tenant != tenant:
                self.failures.append(f"{kind} call {req} to {tenant}: {exc!r}")
            return
        if isinstance(exc, corral.WorkerError):
            if exc.tenant != tenant:
                self.failures.append(f"call {req} to {tenant} failed for {exc.tenant}: {exc!r}")
            self.ledger.saw(exc.pid)
        error = _Error.of(kind, tenant, exc)
        # The faults a call's own error reveals: they explain its neighbours' errors.
        if kind == "crash" and error.type is corral.WorkerCrashedError:
            if error.exitcode == CRASH_CODE:
                self.faults.note("crash", error.pid, error.at)
        elif kind == "garbage" and error.type is corral.ProtocolError:
            self.faults.note("garbage", error.pid, error.at)
        if error.type is corral.CallTimeoutError:
            self.faults.note("timeout", error.pid, error.at)
        self.pending.append(error)

    # -- callers and chaos ---------------------------------------------------------------------

    async def caller(self) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while not self.stop.is_set():
            pool = HOT if self.rng.random() < HOT_SHARE else TENANTS
            await self.call(self.rng.choice(pool), self.rng.choices(kinds, weights)[0])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.helpers.add(task)
        task.add_done_callback(self.helpers.discard)

    async def chaos(self) -> None:
        actions, weights = list(CHAOS_ACTIONS), list(CHAOS_ACTIONS.values())
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.05, 0.25))  # ok-sleep: chaos pacing
            action = self.rng.choices(actions, weights)[0]
            # Snapshot and act in one step (no await between): the pid is still that worker's.
            if action == "sigkill_warden":
                self._kill_warden()
                continue
            workers = [w for w in self.sup.stats().workers if w.pid is not None]
            if not workers:
                continue
            target = self.rng.choice(workers)
            assert target.pid is not None
            self.ledger.saw(target.pid)
            self.faults.note(action, target.pid, time.monotonic())  # before it can take effect
            if action == "evict":
                self.injected[action] += 1
                self._spawn(self._evict(target.tenant))
                continue
            try:
                os.kill(target.pid, signal.SIGKILL if action == "sigkill" else signal.SIGSTOP)
            except ProcessLookupError:  # it exited; corral has not heard yet
                self.injected[f"{action} missed"] += 1
                continue
            self.injected[action] += 1
            if action == "sigstop":
                self.injected[f"sigstop while {target.state}"] += 1
                self.stop_log.expect(target.pid, target.state)
                if target.state in ("ready", "busy"):  # the probe's timeout must kill it
                    self._spawn(self.call(target.tenant, "probe"))

    def _kill_warden(self) -> None:
        """SIGKILL the warden: its workers die with it (parent-death signal) and the next
        start makes a new one. (Its pid is not in stats(): read from the launcher.)"""
        warden = self.sup._launcher.warden_pid  # type: ignore[attr-defined]
        if warden is None:
            return
        self.faults.warden_died(time.monotonic())
        try:
            os.kill(warden, signal.SIGKILL)
        except ProcessLookupError:
            self.injected["sigkill_warden missed"] += 1
            return
        self.injected["sigkill_warden"] += 1

    async def _evict(self, tenant: str) -> None:
        try:
            async with asyncio.timeout(CALL_DEADLINE):
                await self.sup.evict(tenant)
        except TimeoutError:
            self.failures.append(f"evict({tenant!r}) pending after {CALL_DEADLINE}s")

    async def observe(self) -> None:
        """Checks the table and the process tree at many points during the run; judges
        errors as they come of age, and forgets pids verified gone and stale faults."""
        while not self.stop.is_set():
            await asyncio.sleep(0.02)  # ok-sleep: sampling pacing
            self.snapshots += 1
            self.failures.extend(table_problems(self.sup))
            live = live_grandchildren()
            self.max_live = max(self.max_live, len(live))
            if len(live) > MAX_WORKERS:
                self.failures.append(f"{len(live)} live workers > max_workers: {live}")
            for pid in live:
                self.ledger.saw(pid)
            if self.snapshots % 50 == 0:
                now = time.monotonic()
                self.judge(until=now - JUDGE_DELAY)
                self.faults.prune(now)
                self.ledger.prune(keep={w.pid for w in self.sup.stats().workers})

    # -- the verdict ---------------------------------------------------------------------------

    def judge(self, until: float = math.inf) -> None:
        """Each error must be explained by its own call's fault or one injected into its
        worker around that time (see the module docstring)."""
        while self.pending and self.pending[0].at <= until:
            e = self.pending.popleft()
            pid, at, faults = e.pid, e.at, self.faults
            if e.type is corral.CallTimeoutError:
                ok = e.kind in ("hang", "ahang") or faults.explains("sigstop", pid, at)
            elif e.type is corral.WorkerStoppedError:
                ok = (e.reason == "timeout" and faults.explains("timeout", pid, at)) or (
                    e.reason == "evicted" and faults.explains("evict", pid, at)
                )
            elif e.type is corral.WorkerCrashedError:
                ok = (
                    (e.signal == signal.SIGKILL and faults.explains("sigkill", pid, at))
                    or (e.exitcode == CRASH_CODE and faults.explains("crash", pid, at))
                    or ("warden process died" in e.text and faults.warden_explains(at))
                )
            elif e.type is corral.ProtocolError:
                ok = faults.explains("garbage", pid, at)
            elif e.type is corral.StartError:  # killed, evicted or stopped while starting
                ok = any(faults.explains(f, pid, at) for f in ("sigkill", "evict", "sigstop"))
                ok = ok or ("warden" in e.text and faults.warden_explains(at))
            else:
                ok = False
            if ok:
                self.explained += 1
            else:
                self.failures.append(
                    f"unexplained {e.kind} outcome for {e.tenant}: {e.text}{faults.near(at)}"
                )
        self.stop_log.judge(self.faults, self.failures, until)


class StopLog:
    """The end of each SIGSTOPped worker: its "stopped" event (collected by the
    ``on_event`` hook, which must not block), judged like the errors, once old enough."""

    def __init__(self) -> None:
        # SIGSTOPped pid -> (wall time, as events carry; its state then)
        self.waiting: dict[int, tuple[float, str]] = {}
        self.ends: deque[tuple[corral.WorkerEvent, str]] = deque()
        self.verdict: Counter[str] = Counter()
        self.lru = 0  # workers stopped by LRU so far
        self.churned = asyncio.Event()  # set once more than LRU_CHURN were

    def expect(self, pid: int, state: str) -> None:
        self.waiting[pid] = (time.time(), state)

    def __call__(self, event: corral.WorkerEvent) -> None:
        if event.kind != "stopped" or event.pid is None:
            return
        if event.reason == "lru":
            self.lru += 1
            if self.lru > LRU_CHURN:
                self.churned.set()
        stopped = self.waiting.get(event.pid)
        if stopped is not None and event.at >= stopped[0]:
            del self.waiting[event.pid]
            self.ends.append((event, stopped[1]))

    def judge(self, faults: Faults, failures: list[str], until: float = math.inf) -> None:
        """A SIGSTOPped worker cannot answer ``Shutdown`` (nor ``Start``), so it must have
        been killed: by a call's timeout (or the start timeout), by the chaos task's
        SIGKILL, or by the TERM/KILL rungs of an LRU/TTL/evict/close stop; or what it did
        just before it was stopped ended it (a crash call's exit, a garbage frame already
        in the pipe). Never stopped at the ASK rung (unless it had been asked before it was
        stopped); never left running (see :meth:`unended`)."""
        offset = time.monotonic() - time.time()  # events carry wall time
        while self.ends and self.ends[0][0].at + offset <= until:
            end, state = self.ends.popleft()
            pid, at = end.pid, end.at + offset
            self.verdict[end.reason or "?"] += 1
            if end.reason in ("timeout", "start_timeout"):
                continue
            if end.reason in ("crashed", "start_failed") and (
                faults.explains("sigkill", pid, at) or faults.explains("crash", pid, at)
            ):
                continue
            # The chaos task's own SIGKILL ended it, whatever corral was doing with it (a
            # draining worker, say: its reason is already set, and no rung climbed yet).
            if end.returncode == -signal.SIGKILL and faults.explains("sigkill", pid, at):
                continue
            if end.reason == "protocol_error" and faults.explains("garbage", pid, at):
                continue
            if end.reason == "warden_died" and faults.warden_explains(at):
                continue
            # Being stopped (its reason already set) when the warden was killed: it died
            # with the warden, and no exit status exists (returncode None).
            if end.returncode is None and faults.warden_explains(at):
                continue
            # Stopped while stopping: it may have obeyed Shutdown before the signal landed.
            forced = end.rung in ("term", "kill") or state == "stopping"
            if forced and end.reason in ("lru", "idle_ttl", "evicted", "closed"):
                continue
            failures.append(f"SIGSTOPped worker {pid} ended oddly: {end}")

    def unended(self) -> list[int]:
        return sorted(self.waiting)


async def test_chaos_every_call_has_one_explained_outcome_and_nothing_leaks(
    scratch: Path,
) -> None:
    """SECONDS of chaos (see the module docstring), then every call is judged and the
    host is compared with before: fds, threads and tasks exactly, RSS within RSS_BOUND,
    no process left below it (zombies included), no worker pid it saw still running."""
    seed = os.environ.get("CORRAL_CHAOS_SEED", secrets.token_hex(4))
    lock_dir = make_lock_dir(scratch, TENANTS)
    options = {**OPTIONS, **overlap_options(lock_dir)}

    # Warm up: first-use imports and caches of a supervisor's life are not a leak.
    async with Supervisor(KERNEL, **options) as warm:
        for tenant in TENANTS[:3]:
            await warm.call(tenant, "echo", 0, "warm")
    procs_before, threads_before = descendants(), set(threading.enumerate())
    before = Resources.now()

    stop_log = StopLog()
    watch, ledger = AnswerWatch(), PidLedger()
    began = time.monotonic()
    with CorralLogs.attached() as logs, LoopErrors().installed() as loop_errors:
        sup = Supervisor(KERNEL, on_event=stop_log, **options)
        await sup.start()
        chaos = Chaos(sup, watch, ledger, random.Random(seed), stop_log)
        tasks = [asyncio.ensure_future(chaos.caller()) for _ in range(CALLERS)]
        tasks += [asyncio.ensure_future(chaos.chaos()), asyncio.ensure_future(chaos.observe())]
        try:
            await asyncio.sleep(SECONDS)  # ok-sleep: the length of the chaos run
            async with asyncio.timeout(4 * CALL_DEADLINE):  # ...and until the LRU churned
                await stop_log.churned.wait()
            chaos.stop.set()
            async with asyncio.timeout(2 * CALL_DEADLINE):  # each caller ends its last call
                await asyncio.gather(*tasks)
                while chaos.helpers:  # probes and evictions still in flight
                    await asyncio.gather(*list(chaos.helpers))
            ran = time.monotonic() - began
            chaos.failures.extend(table_problems(sup))
        finally:
            for task in [*tasks, *chaos.helpers]:
                task.cancel()  # only if the run failed: they are done otherwise
            await asyncio.gather(*tasks, *chaos.helpers, return_exceptions=True)
            closing = time.monotonic()
            async with asyncio.timeout(CALL_DEADLINE):
                await sup.aclose()
            close_took = time.monotonic() - closing
            watch.close()
    after = Resources.now(settle=threads_before)
    leftovers = leftover_processes(procs_before)
    still_running = ledger.still_running()

    chaos.judge()
    for pid in stop_log.unended():
        chaos.failures.append(f"SIGSTOPped worker {pid} has no 'stopped' event")
    stopped_ends = stop_log.verdict
    stats = sup.stats()
    leaks = after.leaks_since(before, RSS_BOUND)
    inner: Counter[str] = Counter()
    for (kind, _), n in chaos.by_kind.items():
        if kind not in ("echo", "aecho", "probe"):
            inner[kind] += n
    leak_count = len(leaks) + len(leftovers) + len(still_running)
    overlap_count = len(logs.overlaps) + len(watch.violations)
    stops = dict(sorted(stats.stops.items()))
    print(
        f"\nchaos (seed {seed}): {ran:.1f}s, {chaos.started} calls "
        f"({chaos.started / ran:.0f}/s) over {len(TENANTS)} tenants, "
        f"max_workers={MAX_WORKERS}, {CALLERS} callers\n"
        f"  outcomes: {dict(chaos.outcomes.most_common())}\n"
        f"  by kind: {dict(sorted(chaos.by_kind.items()))}\n"
        f"  faults injected from outside: {dict(chaos.injected)}; by kernels: {dict(inner)}\n"
        f"  SIGSTOPped workers ended by: {dict(stopped_ends)}\n"
        f"  workers started {stats.starts}, stopped by reason {stops}\n"
        f"  checked: {watch.answers} answers (tenant, request, nonce, one live worker per "
        f"tenant), {chaos.explained} errors explained, {chaos.snapshots} table/process "
        f"snapshots (max live workers {chaos.max_live}), {ledger.seen} worker pids\n"
        f"  aclose took {close_took:.2f}s; before {before.describe()}; after {after.describe()}\n"
        f"  leaks found: {leak_count}; overlaps: {overlap_count}; loop errors: "
        f"{len(loop_errors.errors)}; corral errors logged: {len(logs.errors)}; unexplained "
        f"or wrong outcomes: {len(chaos.failures)}"
    )
    assert chaos.started == chaos.finished == sum(chaos.outcomes.values())
    assert not chaos.failures, chaos.failures[:20]
    assert not watch.violations, watch.violations[:20]
    assert not logs.overlaps, logs.overlaps[:20]
    assert not logs.errors, logs.errors[:20]
    assert not loop_errors.errors, loop_errors.errors[:20]
    assert not leftovers, f"processes left after aclose(): {leftovers}"
    assert not still_running, f"workers still running after aclose(): {still_running}"
    assert not leaks, leaks
    # The run did what it claims: each kind of fault happened and had its effect.
    assert chaos.injected["sigkill"] and chaos.injected["sigstop"] and chaos.injected["evict"]
    assert stopped_ends["timeout"] > 0, "no SIGSTOPped worker was killed by a call timeout"
    for kind, outcome in [
        ("fail", "KernelError"),
        ("crash", "WorkerCrashedError"),
        ("hang", "CallTimeoutError"),
        ("ahang", "CallTimeoutError"),
        ("garbage", "ProtocolError"),
        ("echo", "result"),
        ("aecho", "result"),
    ]:
        assert chaos.by_kind[kind, outcome] > 0, (kind, outcome)
    assert stats.stops.get("lru", 0) > LRU_CHURN, "no LRU churn"
    assert stats.state == "closed" and stats.workers == []


# -- a frozen warden ----------------------------------------------------------------------------

FROZEN: dict[str, Any] = {
    "start_timeout": 1.0,
    "shutdown_timeout": 0.5,
    "term_timeout": 0.5,
    "kill_timeout": 1.0,
}


async def _thaw_by_killing(sup: Supervisor, warden: int) -> None:
    """Clean up after a frozen-warden test: SIGKILL the warden (its workers die with it,
    by their parent-death signal), then aclose() can finish."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(warden, signal.SIGKILL)
    async with asyncio.timeout(CALL_DEADLINE):
        await sup.aclose()


async def test_a_start_fails_within_start_timeout_when_the_warden_is_frozen() -> None:
    sup = Supervisor(KERNEL, **FROZEN)
    await sup.start()
    warden = sup._launcher.warden_pid  # type: ignore[attr-defined]
    call: asyncio.Future[Any] | None = None
    try:
        assert _answered(await sup.call("a", "echo", 1, "n"), "a", 1, "n")
        os.kill(warden, signal.SIGSTOP)
        # A worker already running does not need the warden to answer:
        assert _answered(await sup.call("a", "echo", 2, "n"), "a", 2, "n")
        call = asyncio.ensure_future(sup.call("b", "echo", 3, "n"))
        # The start timeout ends it without the warden; a hang guard, not a measure.
        done, _ = await asyncio.wait([call], timeout=FROZEN["start_timeout"] + 30.0)
        assert done, f"no outcome {FROZEN['start_timeout'] + 30.0}s after the call: {sup.stats()}"
        with pytest.raises(corral.StartError):
            call.result()
    finally:
        if call is not None and not call.done():
            call.cancel()
        await _thaw_by_killing(sup, warden)
        if call is not None:
            await asyncio.gather(call, return_exceptions=True)


async def test_aclose_returns_when_the_warden_is_frozen() -> None:
    sup = Supervisor(KERNEL, **FROZEN)
    await sup.start()
    warden = sup._launcher.warden_pid  # type: ignore[attr-defined]
    try:
        pid = (await sup.call("a", "echo", 1, "n"))["pid"]
        os.kill(warden, signal.SIGSTOP)
        # Shutdown, SIGTERM and SIGKILL take shutdown + term + kill timeouts at most (2 s);
        # a hang guard, not a measure.
        closing = asyncio.ensure_future(sup.aclose())
        done, _ = await asyncio.wait([closing], timeout=30.0)
        assert done, f"aclose() pending 30 s after it began: {sup.stats()}"
        assert pid_gone(pid) and pid_gone(warden)
    finally:
        await _thaw_by_killing(sup, warden)


def _answered(value: Any, tenant: str, req: int, nonce: str) -> bool:
    expected = {"tenant": tenant, "req": req, "nonce": nonce, "overlap": False}
    return isinstance(value, dict) and {k: value.get(k) for k in expected} == expected
