"""corral side by side with the alternatives, measured in one process run.

    python benchmarks/compare.py [--smoke] [--json PATH] [--write-readme]

Every scenario runs its contenders interleaved in short chunks (a chunk of calls for
one, a chunk for the next, ..., repeated, in a rotating order), so that whatever the
machine does meanwhile falls on all of them alike. For each scenario it prints
medians, p99 and how corral compares; then the targets, each PASS or MISS with its
measured ratio. Nothing is asserted: the exit status is 0 unless something broke or
a process was left behind.

Contenders (see ``_peers.py``):

* the limits, built by hand: a forked child on raw pipes with msgspec frames, driven
  with blocking calls ("the limit") and from asyncio with ``add_reader`` ("the async
  limit");
* ``multiprocessing.Pipe``, ``concurrent.futures.ProcessPoolExecutor``, loky's
  reusable executor and ``pebble.ProcessPool`` (each pool with one worker);
* corral: ``Supervisor`` with the default sandbox (and ``Sandbox.none()`` for the
  one-caller warm call), the bundled demo kernel (``put``) or ``_kernel.py``'s echo.

Where a contender cannot do what a scenario asks (a per-tenant worker, concurrent
callers on a blocking connection, a per-key start), its row says n/a and why.
``--smoke`` runs every scenario and contender once with tiny counts (CI runs it so
that this script cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib.metadata
import itertools
import json
import os
import platform
import random
import statistics
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import _kernel
import _peers
import psutil

from corral import Sandbox, Supervisor
from corral.supervisor._table import WorkerTable

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
ECHO = "_kernel:make"  # importable in workers: this directory is on sys.path (sys.path[0])
ASYNC_ECHO = "_kernel:make_async"

# Contenders
RAW = "raw pipe, blocking (the limit)"
ARAW = "raw pipe, asyncio (the async limit)"
MP = "multiprocessing.Pipe"
PPE = "ProcessPoolExecutor"
LOKY = "loky"
PEBBLE = "pebble"
CORRAL = "corral"  # the default sandbox
CORRAL_NONE = "corral, Sandbox.none()"
CORRAL_ASYNC = "corral, kernel with an async method"
FORK = "plain os.fork()"
INTERPRETER = "fresh interpreter"
BARE = "minimal fork-server child"
MP_FORKSERVER = "multiprocessing forkserver child"
POOLS = (PPE, LOKY, PEBBLE)
AWAITED = {name: f"{name}, awaited" for name in POOLS}  # a pool's future awaited on the loop
ORDER = (
    RAW,
    ARAW,
    MP,
    PPE,
    LOKY,
    PEBBLE,
    *AWAITED.values(),
    FORK,
    INTERPRETER,
    MP_FORKSERVER,
    BARE,
    CORRAL_ASYNC,
    CORRAL_NONE,
    CORRAL,
)

# Scenarios, in the order they run (tests/test_benchmarks.py looks for these names)
WARM = "warm call, one caller"
WARM_ONE_CPU = "warm call, one caller, everything on one CPU"
WARM_64 = "warm call, 64 callers on one worker"
WARM_32 = "warm call, 32 tenants on 32 workers"
PIPELINED = "pipelined throughput, 1,000 calls in flight"
MEMORY = "idle worker memory"
TABLE = "LRU/TTL table operations"
COLD = "cold start"
CHURN = "churn"
PAYLOAD = "payload round trip"

# Why a contender sits out a scenario
BLOCKING_ONLY = "a blocking connection without request ids: one call at a time"
NO_KEYS = "no per-key workers: a pool hands each call to whichever worker is free"
NO_START = "no per-key start: a pool starts its workers once, up front"
FORKED = "a fork of this host, as in the plain os.fork() row"

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Counts:
    """How much of each scenario to run. Chunks interleave; rounds repeat them."""

    warm_rounds: int = 20
    warm_chunk: int = 200  # calls per contender per round
    concurrent_rounds: int = 20
    calls_per_caller: int = 5  # per caller per round (64 or 32 callers)
    pipelined_rounds: int = 15
    in_flight: int = 1000
    cold_rounds: int = 10
    cold_chunk: int = 4
    table_rounds: int = 2000
    table_batch: int = 32  # operations timed together
    churn_cycles: int = 2000
    churn_chunk: int = 100
    payloads: tuple[tuple[int, int, int], ...] = (  # (bytes, rounds, chunk)
        (1 * KIB, 10, 20),
        (64 * KIB, 10, 10),
        (1 * MIB, 10, 4),
        (16 * MIB, 5, 2),
    )


FULL = Counts()
SMOKE = Counts(
    warm_rounds=2,
    warm_chunk=5,
    concurrent_rounds=1,
    calls_per_caller=1,
    pipelined_rounds=1,
    in_flight=50,
    cold_rounds=1,
    cold_chunk=1,
    table_rounds=2,
    churn_cycles=10,
    churn_chunk=5,
    payloads=((1 * KIB, 1, 1), (64 * KIB, 1, 1), (1 * MIB, 1, 1), (16 * MIB, 1, 1)),
)


# --- samples and interleaving -------------------------------------------------------------


@dataclass
class Samples:
    """What one contender produced in one scenario."""

    values: list[float] = field(default_factory=list)  # per call (or batch, cycle, worker)
    ops: int = 0  # calls made
    seconds: float = 0.0  # wall time those calls took

    def extend(self, other: Samples) -> None:
        self.values += other.values
        self.ops += other.ops
        self.seconds += other.seconds

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


class NotApplicable(NamedTuple):
    reason: str


Outcome = Samples | NotApplicable
Measure = Callable[[int], Awaitable[Samples]]  # make n calls (or cycles), return samples
AsyncCall = Callable[[int], Awaitable[Any]]  # one call, given its index


async def interleave(measures: dict[str, Measure], rounds: int, chunk: int) -> dict[str, Samples]:
    """``rounds`` rounds of ``chunk`` operations per contender, the order rotating each
    round, after one unrecorded warm-up chunk each."""
    for measure in measures.values():
        await measure(min(chunk, 20))
    names = list(measures)
    out = {name: Samples() for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            out[name].extend(await measures[name](chunk))
    return out


def one_caller(call: Callable[[int], Any]) -> Measure:
    """Blocking calls, one after another."""

    async def measure(n: int) -> Samples:
        values = []
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            call(i)
            values.append(time.perf_counter() - t)
        return Samples(values, n, time.perf_counter() - start)

    return measure


def one_async_caller(call: AsyncCall) -> Measure:
    """Awaited calls, one after another."""

    async def measure(n: int) -> Samples:
        values = []
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await call(i)
            values.append(time.perf_counter() - t)
        return Samples(values, n, time.perf_counter() - start)

    return measure


def many_callers(calls: Sequence[AsyncCall]) -> Measure:
    """One task per entry of ``calls``, all at once, each making n calls in turn."""

    async def measure(n: int) -> Samples:
        values: list[float] = []

        async def caller(call: AsyncCall) -> None:
            for i in range(n):
                t = time.perf_counter()
                await call(i)
                values.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(caller(call) for call in calls))
        return Samples(values, len(values), time.perf_counter() - start)

    return measure


def gathered(call: AsyncCall) -> Measure:
    """n calls in flight at once (``asyncio.gather``); one value: the batch's seconds."""

    async def measure(n: int) -> Samples:
        start = time.perf_counter()
        await asyncio.gather(*(call(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        return Samples([elapsed], n, elapsed)

    return measure


def batch(run: Callable[[int], object]) -> Measure:
    """``run(n)`` makes n calls its own (blocking) way; one value: the batch's seconds."""

    async def measure(n: int) -> Samples:
        start = time.perf_counter()
        run(n)
        elapsed = time.perf_counter() - start
        return Samples([elapsed], n, elapsed)

    return measure


# --- where the processes run ----------------------------------------------------------------


class Placement:
    """Which CPUs this process and the processes it started may run on, for the call
    scenarios: the same for every contender, so that no row is faster or slower by where
    the scheduler happened to put its worker. (On this kind of VM a round trip with both
    ends on one CPU costs 1.3-1.5x one with an end on each.)

    ``apart()``: this process's threads on the first CPU, every descendant on the others
    (a worker forked later inherits its parent's CPUs: corral's warden is a descendant).
    ``together()``: everything on the first CPU. ``release()``: everything back on all
    the CPUs this process started with. With one CPU, nothing is pinned."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0))
        self.host, self.workers = {self.cpus[0]}, set(self.cpus[1:]) or {self.cpus[0]}
        self.pinned = len(self.cpus) > 1

    def describe(self) -> str:
        if not self.pinned:
            return "one CPU: nothing pinned"
        return f"this process on CPU {self.cpus[0]}, its children on {_cpu_list(self.workers)}"

    def apart(self) -> None:
        self._pin(self.host, self.workers)

    def together(self) -> None:
        self._pin(self.host, self.host)

    def release(self) -> None:
        self._pin(set(self.cpus), set(self.cpus))

    def _pin(self, host: set[int], children: set[int]) -> None:
        if not self.pinned:
            return
        _pin_threads(os.getpid(), host)
        for child in psutil.Process().children(recursive=True):
            _pin_threads(child.pid, children)


def _pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (a thread started later inherits its starter's CPUs)."""
    with contextlib.suppress(OSError):  # gone meanwhile
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def _cpu_list(cpus: set[int]) -> str:
    return ", ".join(str(cpu) for cpu in sorted(cpus))


# --- the contenders -----------------------------------------------------------------------


@dataclass
class Contenders:
    raw: _peers.RawPipe
    araw: _peers.AsyncRawPipe
    mp: _peers.MpPipe
    pools: dict[str, _peers.Pool]
    sup: Supervisor  # _kernel's Echo, default sandbox
    sup_none: Supervisor  # the same, Sandbox.none()
    sup_async: Supervisor  # _kernel's AsyncEcho (served on asyncio), default sandbox
    sup_starts: Supervisor  # _kernel's Echo, for cold starts and churn
    place: Placement = field(default_factory=Placement)


async def open_contenders(stack: contextlib.AsyncExitStack) -> Contenders:
    """Start every contender; ``stack`` closes them (and reaps their processes).

    The order matters: children forked straight from this host without closing what
    they inherit (multiprocessing's, the fork-based pools') come first, before any
    pipe they could hold open; the raw children close everything they do not need."""
    loop = asyncio.get_running_loop()
    mp = _peers.MpPipe()
    stack.callback(mp.close)
    pools: dict[str, _peers.Pool] = {}
    for name, make in (
        (PPE, _peers.process_pool_executor),
        (PEBBLE, _peers.pebble_pool),
        (LOKY, _peers.loky_pool),  # fork + exec: inherits nothing
    ):
        pools[name] = make()
        stack.callback(pools[name].close)
    raw = _peers.RawPipe()
    stack.callback(raw.close)
    araw = _peers.AsyncRawPipe(loop)
    stack.callback(araw.close)
    sups = [
        Supervisor(ECHO, max_workers=64),
        Supervisor(ECHO, max_workers=4, sandbox=Sandbox.none()),
        Supervisor(ASYNC_ECHO, max_workers=4),
        Supervisor(ECHO, max_workers=4),
    ]
    for sup in sups:
        await stack.enter_async_context(sup)
    sup, sup_none, sup_async, sup_starts = sups
    return Contenders(raw, araw, mp, pools, sup, sup_none, sup_async, sup_starts)


def put_calls(c: Contenders) -> dict[str, AsyncCall]:
    """``put("k", i)`` on one worker, awaitable, per contender that can be awaited."""
    calls: dict[str, AsyncCall] = {ARAW: partial(c.araw.call, "put", "k")}
    for name, pool in c.pools.items():
        calls[name] = partial(pool.acall, _kernel.put, "k")
    calls[CORRAL_ASYNC] = partial(c.sup_async.call, "warm", "put", "k")
    calls[CORRAL] = partial(c.sup.call, "warm", "put", "k")
    return calls


# --- scenarios ----------------------------------------------------------------------------


async def warm_one_caller(c: Contenders, n: Counts) -> dict[str, Outcome]:
    measures: dict[str, Measure] = {
        RAW: one_caller(partial(c.raw.call, "put", "k")),
        ARAW: one_async_caller(partial(c.araw.call, "put", "k")),
        MP: one_caller(partial(c.mp.call, "put", "k")),
    }
    for name, pool in c.pools.items():
        measures[name] = one_caller(partial(pool.call, _kernel.put, "k"))
        measures[AWAITED[name]] = one_async_caller(partial(pool.acall, _kernel.put, "k"))
    measures[CORRAL_ASYNC] = one_async_caller(partial(c.sup_async.call, "warm", "put", "k"))
    measures[CORRAL_NONE] = one_async_caller(partial(c.sup_none.call, "warm", "put", "k"))
    measures[CORRAL] = one_async_caller(partial(c.sup.call, "warm", "put", "k"))
    return dict(await interleave(measures, n.warm_rounds, n.warm_chunk))


async def warm_64_callers(c: Contenders, n: Counts) -> dict[str, Outcome]:
    measures = {name: many_callers([call] * 64) for name, call in put_calls(c).items()}
    out: dict[str, Outcome] = {RAW: NotApplicable(BLOCKING_ONLY), MP: NotApplicable(BLOCKING_ONLY)}
    out.update(await interleave(measures, n.concurrent_rounds, n.calls_per_caller))
    return out


async def warm_32_tenants(c: Contenders, n: Counts) -> dict[str, Outcome]:
    loop = asyncio.get_running_loop()
    tenants = [f"tenant-{k:02}" for k in range(32)]
    await asyncio.gather(*(c.sup.get_or_create(t) for t in tenants))
    pipes = []
    try:
        for _ in tenants:
            pipes.append(_peers.AsyncRawPipe(loop))
        c.place.apart()  # the new raw children were forked from this (pinned) process
        measures = {
            ARAW: many_callers([partial(p.call, "put", "k") for p in pipes]),
            CORRAL: many_callers([partial(c.sup.call, t, "put", "k") for t in tenants]),
        }
        samples = await interleave(measures, n.concurrent_rounds, n.calls_per_caller)
    finally:
        for pipe in pipes:
            pipe.close()
    out: dict[str, Outcome] = {RAW: NotApplicable(BLOCKING_ONLY), MP: NotApplicable(BLOCKING_ONLY)}
    out.update({name: NotApplicable(NO_KEYS) for name in POOLS})
    out.update(samples)
    return out


async def pipelined(c: Contenders, n: Counts) -> dict[str, Outcome]:
    measures = {RAW: batch(c.raw.pipelined), MP: batch(c.mp.pipelined)}
    measures.update({name: gathered(call) for name, call in put_calls(c).items()})
    return dict(await interleave(measures, n.pipelined_rounds, n.in_flight))


def uss(pid: int) -> int:
    """Bytes of memory only this process holds (unique set size)."""
    return int(psutil.Process(pid).memory_full_info().uss)


def idle_memory(c: Contenders) -> dict[str, Outcome]:
    """USS of each contender's worker(s) after the call scenarios, now idle; for the
    bare forkserver child and the fresh interpreter, after one round trip."""
    pids: dict[str, list[int]] = {
        RAW: [c.raw.pid, c.araw.pid],
        MP: [c.mp.pid],
        **{name: [pool.pid] for name, pool in c.pools.items()},
        CORRAL_ASYNC: [w.pid for w in c.sup_async.stats().workers if w.pid is not None],
        CORRAL: [w.pid for w in c.sup.stats().workers if w.pid is not None],
    }
    out: dict[str, Outcome] = {}
    for name, ids in pids.items():
        out[name] = Samples([float(uss(pid)) for pid in ids])
    starts: tuple[tuple[str, Callable[[], Any]], ...] = (
        (MP_FORKSERVER, _peers.MpForkserverChild),
        (BARE, _peers.BareForkserver),
        (INTERPRETER, _peers.Interpreter),
    )
    for name, make in starts:
        children = []
        try:
            for _ in range(3):
                children.append(make())
            out[name] = Samples([float(uss(child.pid)) for child in children])
        finally:
            for child in children:
                child.close()
    return out


async def payloads(c: Contenders, n: Counts) -> dict[int, dict[str, Outcome]]:
    out: dict[int, dict[str, Outcome]] = {}
    for size, rounds, chunk in n.payloads:
        data = random.randbytes(size)
        blocking: dict[str, Callable[[], Any]] = {
            RAW: partial(c.raw.call, "echo", data),
            MP: partial(c.mp.call, "echo", data),
            **{name: partial(pool.call, _kernel.echo, data) for name, pool in c.pools.items()},
        }
        awaited: dict[str, Callable[[], Awaitable[Any]]] = {
            ARAW: partial(c.araw.call, "echo", data),
            CORRAL: partial(c.sup.call, "p", "echo", data),
        }
        for name, call in blocking.items():  # each must really echo the payload
            assert call() == data, name
        for name, acall in awaited.items():
            assert await acall() == data, name
        measures = {name: one_caller(_ignore_index(call)) for name, call in blocking.items()}
        for name, acall in awaited.items():
            measures[name] = one_async_caller(_ignore_index(acall))
        out[size] = dict(await interleave(measures, rounds, chunk))
    return out


def _ignore_index(call: Callable[[], T]) -> Callable[[int], T]:
    return lambda _i: call()


class TableOps:
    """corral's WorkerTable at a fixed size, with every entry idle (an evictable worker).

    Three operations, each timed over a batch of ``batch`` in a row:

    * eviction: ``lru_victim()``, ``mark_busy()`` (it is stopping), ``remove()``;
    * insert: ``add()`` and ``mark_idle()`` (a worker started and answered), for the
      tenants just evicted, so the table keeps its size and its set of tenants;
    * touch: ``get()``, ``mark_busy()``, ``mark_idle()`` (a call starts and completes)
      on tenants drawn at random.
    """

    HANDLE = object()  # the table only stores handles

    def __init__(self, size: int, batch: int) -> None:
        self.table: WorkerTable[object] = WorkerTable(size, idle_ttl=900.0, clock=time.monotonic)
        self.tenants = [f"tenant-{i}" for i in range(size)]
        self.batch = min(batch, size)
        for tenant in self.tenants:
            self.table.add(tenant, self.HANDLE)
            self.table.mark_idle(tenant)

    def run(self) -> dict[str, float]:
        """One batch of each operation: nanoseconds per operation."""
        table, batch, handle = self.table, self.batch, self.HANDLE
        evicted = []
        t = time.perf_counter_ns()
        for _ in range(batch):
            victim = table.lru_victim()
            assert victim is not None
            table.mark_busy(victim)
            table.remove(victim)
            evicted.append(victim)
        t_evict = time.perf_counter_ns() - t
        t = time.perf_counter_ns()
        for tenant in evicted:
            table.add(tenant, handle)
            table.mark_idle(tenant)
        t_insert = time.perf_counter_ns() - t
        touched = random.choices(self.tenants, k=batch)
        t = time.perf_counter_ns()
        for tenant in touched:  # what one call does: start, reply, idle mark
            table.get(tenant)
            table.mark_busy(tenant)
            table.touch(tenant)
            table.mark_idle(tenant)
        t_touch = time.perf_counter_ns() - t
        return {"insert": t_insert / batch, "touch": t_touch / batch, "eviction": t_evict / batch}


TABLE_SIZES = (32, 1000, 100_000)
TABLE_OPS = ("insert", "touch", "eviction")


def table_ops(n: Counts) -> dict[str, dict[int, Samples]]:
    """ns/op per operation and table size, the sizes interleaved batch by batch."""
    tables = {size: TableOps(size, n.table_batch) for size in TABLE_SIZES}
    out = {op: {size: Samples() for size in TABLE_SIZES} for op in TABLE_OPS}
    for table in tables.values():
        table.run()  # warm-up
    for _ in range(n.table_rounds):
        for size, table in tables.items():
            for op, ns in table.run().items():
                out[op][size].values.append(ns)
    return out


async def cold_starts(c: Contenders, n: Counts) -> dict[str, Outcome]:
    sup, count = c.sup_starts, itertools.count()

    async def corral_starts(k: int) -> Samples:
        values = []
        for _ in range(k):
            tenant = f"cold-{next(count)}"
            t = time.perf_counter()
            await sup.call(tenant, "getpid")
            values.append(time.perf_counter() - t)
            await sup.evict(tenant)  # not timed
        return Samples(values, k, sum(values))

    def starts(start: Callable[[], float], k: int) -> Samples:
        values = [start() for _ in range(k)]
        return Samples(values, k, sum(values))

    measures: dict[str, Measure] = {
        FORK: _sync(partial(starts, lambda: _peers.fork_start()[0])),
        INTERPRETER: _sync(partial(starts, _peers.interpreter_start)),
        CORRAL: corral_starts,
    }
    out: dict[str, Outcome] = {name: NotApplicable(FORKED) for name in (RAW, ARAW, MP)}
    out.update({name: NotApplicable(NO_START) for name in POOLS})
    out.update(await interleave(measures, n.cold_rounds, n.cold_chunk))
    return out


def _sync(fn: Callable[[int], Samples]) -> Measure:
    async def measure(k: int) -> Samples:
        return fn(k)

    return measure


class HostResources(NamedTuple):
    fds: int
    threads: int
    children: int  # descendants: the wardens and every worker

    @classmethod
    def now(cls) -> HostResources:
        return cls(
            len(os.listdir("/proc/self/fd")),
            threading.active_count(),
            len(psutil.Process().children(recursive=True)),
        )


@dataclass
class Churn:
    cycles: dict[str, Outcome]
    growth: HostResources  # after minus before, over corral's measured cycles


async def churn(c: Contenders, n: Counts) -> Churn:
    """Start + stop cycles: corral's ``get_or_create`` then ``evict``; a fork that answers
    one message, exits and is reaped. Host resources are counted before and after."""
    sup, count = c.sup_starts, itertools.count()

    async def corral_cycles(k: int) -> Samples:
        values = []
        start = time.perf_counter()
        for _ in range(k):
            tenant = f"churn-{next(count)}"
            t = time.perf_counter()
            await sup.get_or_create(tenant)
            await sup.evict(tenant)
            values.append(time.perf_counter() - t)
        return Samples(values, k, time.perf_counter() - start)

    def fork_cycles(k: int) -> Samples:
        values = [_peers.fork_start()[1] for _ in range(k)]
        return Samples(values, k, sum(values))

    measures = {FORK: _sync(fork_cycles), CORRAL: corral_cycles}
    # Warm up for two memory-check intervals: anything created once, lazily (the memory
    # probe's thread starts with the first sample), exists before counting starts; and
    # what earlier scenarios left for the collector is collected on both sides.
    warm_until = time.monotonic() + 2.0
    while time.monotonic() < warm_until:
        await corral_cycles(n.churn_chunk)
    gc.collect()
    before = HostResources.now()
    cycles = await interleave(measures, n.churn_cycles // n.churn_chunk, n.churn_chunk)
    gc.collect()
    after = HostResources.now()
    out: dict[str, Outcome] = {name: NotApplicable(FORKED) for name in (RAW, ARAW, MP)}
    out.update({name: NotApplicable(NO_START) for name in POOLS})
    out.update(cycles)
    return Churn(out, HostResources(*(a - b for a, b in zip(after, before, strict=True))))


# --- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    pool_starts: dict[str, str]  # how each pool starts its worker
    placement: str  # where the call scenarios ran
    warm: dict[str, Outcome]
    warm_one_cpu: dict[str, Outcome]  # the same, with everything on one CPU
    warm_64: dict[str, Outcome]
    warm_32: dict[str, Outcome]
    pipelined: dict[str, Outcome]
    memory: dict[str, Outcome]
    table: dict[str, dict[int, Samples]]
    cold: dict[str, Outcome]
    churn: Churn
    payloads: dict[int, dict[str, Outcome]]


async def run(n: Counts) -> Results:
    async with contextlib.AsyncExitStack() as stack:
        c = await open_contenders(stack)
        assert await c.sup.call("warm", "put", "k", 0) == 1
        assert await c.sup_none.call("warm", "put", "k", 0) == 1
        assert await c.sup_async.call("warm", "put", "k", 0) == 1
        assert c.raw.call("put", "k", 0) == 1 and await c.araw.call("put", "k", 0) == 1
        place = c.place
        try:
            place.together()
            warm_one_cpu = await warm_one_caller(c, n)
            place.apart()  # the call scenarios: this process on one CPU, workers on another
            warm = await warm_one_caller(c, n)
            warm_64, warm_32 = await warm_64_callers(c, n), await warm_32_tenants(c, n)
            piped = await pipelined(c, n)
            place.release()  # starts, memory and the table as the scheduler places them
            memory = idle_memory(c)  # before any worker has held a 16 MiB payload
            table = table_ops(n)
            # Before the payloads too: they leave this process hundreds of MiB bigger, and
            # forking a bigger process takes longer (corral's starts do not fork it).
            cold, churned = await cold_starts(c, n), await churn(c, n)
            place.apart()
            sized = await payloads(c, n)
        finally:
            place.release()
        return Results(
            pool_starts={name: pool.start_method for name, pool in c.pools.items()},
            placement=place.describe(),
            warm=warm,
            warm_one_cpu=warm_one_cpu,
            warm_64=warm_64,
            warm_32=warm_32,
            pipelined=piped,
            memory=memory,
            table=table,
            cold=cold,
            churn=churned,
            payloads=sized,
        )


# --- report -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.1 else f"{seconds * 1e3:.1f} ms"


def per_second(rate: float) -> str:
    return f"{rate:,.0f}/s"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.2f} MiB"


class Comparison(NamedTuple):
    """How a table compares each contender with corral: on which figure, which way."""

    key: Callable[[Samples], float]
    higher_is_better: bool = False
    words: tuple[str, str] = ("faster", "slower")

    def versus(self, corral_samples: Samples, samples: Samples) -> str:
        mine, theirs = self.key(corral_samples), self.key(samples)
        ratio = mine / theirs if self.higher_is_better else theirs / mine
        better, worse = self.words
        return f"corral {ratio:.2f}x {better}" if ratio >= 1 else f"corral {1 / ratio:.2f}x {worse}"


BY_MEDIAN = Comparison(lambda s: s.median)
BY_RATE = Comparison(lambda s: s.rate, higher_is_better=True)
BY_SIZE = Comparison(lambda s: s.median, words=("smaller", "larger"))

Column = tuple[str, Callable[[Samples], str]]
LATENCY: tuple[Column, ...] = (("median", lambda s: ms(s.median)), ("p99", lambda s: ms(s.p99)))
RATE: Column = ("calls/s", lambda s: per_second(s.rate))


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the rest right-aligned. A row
    of two cells whose second starts with "n/a" is a note spanning the other columns."""

    def is_note(row: Sequence[str]) -> bool:
        return len(row) == 2 and row[1].startswith("n/a")

    full = [header, *(row for row in rows if not is_note(row))]
    widths = [max(len(row[0]) for row in [header, *rows])]
    widths += [max(len(r[i]) for r in full if len(r) > i) for i in range(1, len(header))]
    lines = []
    for row in [header, *rows]:
        if is_note(row):
            lines.append(f"  {row[0]:<{widths[0]}}  {row[1]}")
            continue
        cells = [row[0].ljust(widths[0])]
        cells += [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=False)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def outcome_table(
    outcomes: dict[str, Outcome], columns: Sequence[Column], comparison: Comparison
) -> list[str]:
    """One row per contender: its columns, then how corral compares with it."""
    reference = outcomes.get(CORRAL)
    rows = []
    for name, outcome in sorted(outcomes.items(), key=lambda item: ORDER.index(item[0])):
        if isinstance(outcome, NotApplicable):
            rows.append([name, f"n/a: {outcome.reason}"])
            continue
        cells = [name, *(fmt(outcome) for _, fmt in columns)]
        if name != CORRAL and isinstance(reference, Samples):
            cells.append(comparison.versus(reference, outcome))
        rows.append(cells)
    return render(["", *(title for title, _ in columns), "vs corral"], rows)


def report(results: Results, n: Counts) -> list[str]:
    """The per-scenario tables, in the order the scenarios ran."""
    out: list[str] = []

    def section(title: str, about: str) -> None:
        out.extend(["", f"== {title} =="])
        out.extend(textwrap.wrap(about, 96, initial_indent="  ", subsequent_indent="  "))

    starts = ", ".join(f"{name} by {method}" for name, method in results.pool_starts.items())
    section(
        WARM,
        f"put('k', i) on a warm worker, {n.warm_rounds * n.warm_chunk:,} calls each in chunks "
        f"of {n.warm_chunk}. The pools (one worker each; {starts}) block on "
        "submit().result() (their best case, but a call that blocks an asyncio host's "
        "loop), or, awaited, have their future awaited as run_in_executor does (what an "
        "asyncio host has to do); the raw children run the same put. corral runs _kernel.py's "
        "Echo, whose methods are all plain (its worker answers from a blocking loop); "
        f"'{CORRAL_ASYNC}' adds one async def method to it (the worker then runs asyncio). "
        f"This and the other call scenarios run pinned: {results.placement}.",
    )
    out += outcome_table(results.warm, LATENCY, BY_MEDIAN)

    section(
        WARM_ONE_CPU,
        "The same, run before it with this process and every child pinned to one CPU, so "
        "that each round trip is two context switches on it: what a host whose workers "
        "share its CPU pays (no target).",
    )
    out += outcome_table(results.warm_one_cpu, LATENCY, BY_MEDIAN)

    section(
        WARM_64,
        f"64 tasks each awaiting put() {n.calls_per_caller} times a round, "
        f"{n.concurrent_rounds} rounds; the pools' futures are awaited as run_in_executor does; "
        "each pool has one worker.",
    )
    out += outcome_table(results.warm_64, [*LATENCY, RATE], BY_RATE)

    section(
        WARM_32,
        "One task per tenant, each tenant on a worker of its own (32 raw children for the "
        "async limit), same rounds.",
    )
    out += outcome_table(results.warm_32, [*LATENCY, RATE], BY_RATE)

    section(
        PIPELINED,
        f"{n.in_flight:,} put() calls started at once (asyncio.gather), {n.pipelined_rounds} "
        "batches; the blocking raw pipe writes every frame, then reads every reply; "
        "multiprocessing.Pipe sends from a thread while it receives.",
    )
    batch_columns: list[Column] = [
        ("batch median", lambda s: ms(s.median)),
        ("calls/s", lambda s: per_second(n.in_flight / s.median)),
    ]
    out += outcome_table(results.pipelined, batch_columns, BY_MEDIAN)

    section(
        MEMORY,
        "USS (memory no other process shares) of each contender's idle workers after the "
        f"call scenarios, median over the workers measured. {MP_FORKSERVER}: started by "
        "multiprocessing's forkserver (msgspec preloaded) from a fresh Python, idle in a "
        "pipe read; "
        f"{BARE}: forked from a fresh Python that imported msgspec, serving a minimal loop "
        f"(the floor for a Python child); {INTERPRETER}: imported msgspec and psutil; the "
        "last two after one round trip.",
    )
    memory_columns: list[Column] = [
        ("USS", lambda s: mib(s.median)),
        ("workers", lambda s: str(len(s.values))),
    ]
    out += outcome_table(results.memory, memory_columns, BY_SIZE)

    section(
        TABLE,
        f"corral's WorkerTable with every entry idle, in ns per operation: batches of "
        f"{n.table_batch}, {n.table_rounds:,} batches per size, the sizes interleaved. "
        "Eviction: lru_victim + mark_busy + remove; insert: add + mark_idle; touch: get + "
        "mark_busy + touch + mark_idle on a random tenant. The peers have no per-key table.",
    )
    rows = []
    for op, sizes in results.table.items():
        medians = [sizes[size].median for size in TABLE_SIZES]
        rows.append([op, *(f"{m:,.0f} ns" for m in medians), f"{medians[-1] / medians[0]:.2f}x"])
    out += render(["", *(f"{s:,} entries" for s in TABLE_SIZES), "100k / 32"], rows)

    section(
        COLD,
        "The first call for a new key, until its answer. corral: call() on a new tenant "
        "(evicted afterwards, untimed); plain fork: the child answers one pipe message; fresh "
        "interpreter: sys.executable -c, importing msgspec and psutil, answers one message.",
    )
    out += outcome_table(results.cold, LATENCY, BY_MEDIAN)

    cycles = len(_samples(results.churn.cycles[CORRAL]).values)
    section(
        CHURN,
        f"Start + stop, {cycles:,} cycles each: corral get_or_create() + evict() (which "
        "returns once the process is gone); plain fork: fork, one answer, exit, reap.",
    )
    out += outcome_table(
        results.churn.cycles, [*LATENCY, ("cycles/s", lambda s: per_second(s.rate))], BY_RATE
    )
    growth = results.churn.growth
    out.append(
        f"  host, before and after corral's cycles: fds {growth.fds:+d}, "
        f"threads {growth.threads:+d}, child processes {growth.children:+d}"
    )

    section(PAYLOAD, "echo(bytes) round trip, one caller.")
    for size, outcomes in results.payloads.items():
        trips = len(_samples(outcomes[CORRAL]).values)
        out.append(f"  -- {size_label(size)}, {trips} round trips each")
        out += outcome_table(outcomes, LATENCY, BY_MEDIAN)
    return out


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def _samples(outcome: Outcome) -> Samples:
    assert isinstance(outcome, Samples), outcome
    return outcome


@dataclass
class Target:
    what: str
    measured: str
    ratio: float | None  # None: the goal is not a ratio
    goal: str
    passed: bool

    reachable: bool = True  # False: a measured floor in the same run rules the goal out

    @property
    def verdict(self) -> str:
        if self.passed:
            return "PASS"
        return "MISS" if self.reachable else "MISS (beyond the floor)"

    @property
    def ratio_text(self) -> str:
        return "-" if self.ratio is None else f"{self.ratio:.2f}x"


def at_most(what: str, measured: str, ratio: float, goal: float) -> Target:
    return Target(what, measured, ratio, f"<= {goal}x", ratio <= goal)


def at_least(what: str, measured: str, ratio: float, goal: float) -> Target:
    return Target(what, measured, ratio, f">= {goal}x", ratio >= goal)


def targets(results: Results) -> list[Target]:
    warm = {name: _samples(s).median for name, s in results.warm.items()}
    out = [
        at_most(
            "warm call, corral vs the async raw pipe",
            f"{ms(warm[CORRAL])} vs {ms(warm[ARAW])}",
            warm[CORRAL] / warm[ARAW],
            1.5,
        )
    ]
    for name in POOLS:
        awaited = AWAITED[name]
        out.append(
            at_least(
                f"warm call, corral's speed-up over {awaited}",
                f"{ms(warm[awaited])} vs {ms(warm[CORRAL])}",
                warm[awaited] / warm[CORRAL],
                6,
            )
        )
    for name in POOLS:
        # The most any asyncio caller could reach against a blocking pool call: the async
        # raw pipe's own speed-up. Below the goal, the goal is out of reach here.
        ceiling = warm[name] / warm[ARAW]
        target = at_least(
            f"warm call, corral's speed-up over {name} blocking",
            f"{ms(warm[name])} vs {ms(warm[CORRAL])}; the async raw pipe's: {ceiling:.2f}x",
            warm[name] / warm[CORRAL],
            6,
        )
        target.reachable = ceiling >= 6
        out.append(target)
    batch, raw_batch, araw_batch = (
        _samples(results.pipelined[k]).median for k in (CORRAL, RAW, ARAW)
    )
    # The most an asyncio caller (1,000 tasks) could reach: the async raw pipe's own ratio.
    ceiling = raw_batch / araw_batch
    target = at_least(
        "pipelined throughput, corral vs the raw pipe",
        f"a batch in {ms(batch)} vs {ms(raw_batch)}; the async raw pipe's: {ceiling:.2f}x",
        raw_batch / batch,  # throughputs' ratio: the batch times', inverted
        0.35,
    )
    target.reachable = ceiling >= 0.35
    out.append(target)
    cold = {k: _samples(results.cold[k]).median for k in (CORRAL, FORK, INTERPRETER)}
    for name, goal in ((FORK, 2.5), (INTERPRETER, 0.25)):
        out.append(
            at_most(
                f"cold start, corral vs a {name}",
                f"{ms(cold[CORRAL])} vs {ms(cold[name])}",
                cold[CORRAL] / cold[name],
                goal,
            )
        )
    worker = _samples(results.memory[CORRAL]).median
    for name in (MP_FORKSERVER, BARE):
        other = _samples(results.memory[name]).median
        out.append(
            at_most(
                f"idle worker USS, corral vs a {name}",
                f"{mib(worker)} vs {mib(other)}",
                worker / other,
                1.5,
            )
        )
    evict = results.table["eviction"]
    small, large = evict[TABLE_SIZES[0]].median, evict[TABLE_SIZES[-1]].median
    out.append(
        at_most(
            "table eviction, 100,000 vs 32 entries",
            f"{large:,.0f} ns vs {small:,.0f} ns",
            large / small,
            2,
        )
    )
    churn, growth = _samples(results.churn.cycles[CORRAL]), results.churn.growth
    out.append(
        at_least("churn, corral vs 50 cycles/s", f"{churn.rate:,.0f} cycles/s", churn.rate / 50, 1)
    )
    out.append(
        Target(
            f"churn, host growth over {len(churn.values):,} cycles",
            f"fds {growth.fds:+d}, threads {growth.threads:+d}, processes {growth.children:+d}",
            None,
            "none",
            not any(growth),
        )
    )
    return out


# --- environment, JSON, README ------------------------------------------------------------


def environment() -> dict[str, str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {
        name: importlib.metadata.version(name)
        for name in ("corral", "msgspec", "psutil", "loky", "pebble")
    }
    return {
        "machine": f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}",
        "versions": f"Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
    }


def as_json(results: Results, found: list[Target], env: dict[str, str]) -> dict[str, Any]:
    def encode(value: Any) -> Any:
        if isinstance(value, Samples):
            return {
                "median": value.median,
                "p99": value.p99,
                "ops": value.ops,
                "seconds": value.seconds,
                "values": value.values,
            }
        if isinstance(value, NotApplicable):
            return {"n/a": value.reason}
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        return value

    scenarios = {
        WARM: results.warm,
        WARM_ONE_CPU: results.warm_one_cpu,
        WARM_64: results.warm_64,
        WARM_32: results.warm_32,
        PIPELINED: results.pipelined,
        MEMORY: results.memory,
        TABLE: results.table,
        COLD: results.cold,
        CHURN: results.churn.cycles,
        PAYLOAD: results.payloads,
    }
    return {
        "environment": env,
        "placement": results.placement,
        "units": "seconds per call, batch or cycle; bytes for memory; ns per table operation",
        "scenarios": encode(scenarios),
        "churn_growth": results.churn.growth._asdict(),
        "targets": [asdict(t) for t in found],
    }


def target_lines(found: list[Target]) -> list[str]:
    width = max(len(t.what) for t in found)
    return [
        f"  {t.verdict.split()[0]}  {t.what:<{width}}  {t.ratio_text:>6}  (goal {t.goal}; "
        f"{t.measured}){'' if t.passed or t.reachable else '; beyond the floor in this run'}"
        for t in found
    ]


def readme_table(found: list[Target], env: dict[str, str], placement: str) -> str:
    intro = (
        f"Measured on {env['date']} with `{env['command']}`: {env['machine']}; "
        f"{env['versions']}. The call scenarios ran pinned ({placement}). One row per "
        "target; the script also prints every scenario and contender (medians, p99, and "
        "n/a with the reason where one does not apply)."
    )
    lines = [
        textwrap.fill(intro, 84),
        "",
        "| target | measured | ratio | goal | |",
        "|---|---|---|---|---|",
    ]
    for t in found:
        verdict = "PASS" if t.passed else f"**{t.verdict}**"
        lines.append(f"| {t.what} | {t.measured} | {t.ratio_text} | {t.goal} | {verdict} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replace what is between README.md's bench markers with ``text``."""
    path = ROOT / "README.md"
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    head, rest = path.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def leftover_children() -> list[str]:
    """Processes this run started and did not reap, once every contender has closed.

    Not counted: the resource trackers loky starts (its own and multiprocessing's);
    they stay until this process exits, which closes their pipe and ends them."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(proc.cmdline()):
                alive.append(proc)
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: every scenario once")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw results here")
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="replace README.md's bench:start/bench:end block with the targets",
    )
    args = parser.parse_args()
    counts = SMOKE if args.smoke else FULL
    # This process forks while it has threads (the raw children, the fork baseline, the
    # fork-based pools' workers), on purpose: the children run self-contained loops.
    warnings.filterwarnings(
        "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
    )
    env = environment()
    print(f"{env['command']}\n  {env['machine']}\n  {env['versions']}\n  {env['date']}")
    if args.smoke:
        print("  --smoke: tiny counts, to exercise every scenario; the figures mean nothing")
    started = time.perf_counter()
    results = asyncio.run(run(counts))
    print("\n".join(report(results, counts)))
    found = targets(results)
    print("\n== targets (measured, not asserted) ==")
    print("\n".join(target_lines(found)))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(as_json(results, found, env), indent=1))
    if args.write_readme:
        write_readme(readme_table(found, env, results.placement))
    left = leftover_children()
    if left:
        print(f"processes left behind: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
