"""``corral demo``: a guided tour of corral on the bundled example kernel.

Covers one scripted session on ``corral.examples.demo:create`` (a per-tenant
notebook) that shows, step by step and as it happens, what a supervisor does:
a process per tenant, LRU eviction, a kernel's exception, a crash, a runaway
call, idle expiry, explicit eviction and ``stats()``. corral's own log (loggers
``corral`` and ``corral.worker``) is printed inline, indented and time-stamped,
so lifecycle events show up where they happen. Every step checks what it shows
and the command exits 1 at the first surprise: the demo is also a smoke test.

Not here: how any of it works (:mod:`corral.supervisor`), or tests of the edge
cases (``tests/``). It uses the public API only, as an application would.

It must pass on a loaded machine too, so no step depends on how fast anything
runs: every call but the runaway one has a generous timeout, waits are for
corral's own events (with generous deadlines, as safety nets only), and the
only timed claim it checks follows from the order of events, never from a
measured duration.

Long because the tour is one script, step after step, each with what it shows and what
it checks, so that it reads as the README's story does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TextIO, TypeVar

import msgspec

import corral

__all__ = ["DESCRIPTION", "DemoFailed", "InlineLogFormatter", "add_arguments", "corral_logs", "run"]

DESCRIPTION = (
    "A scripted tour of corral on the bundled example kernel (corral.examples.demo:create): "
    "four tenants on three worker slots, a kernel error, a crash, a runaway call, idle "
    "expiry, an explicit evict, a memory recycle, a typed result, a rolling reload and "
    "stats(). Exits non-zero if anything behaves unexpectedly."
)
FACTORY = "corral.examples.demo:create"

_TOTAL_TIMEOUT = 60.0  # safety net only: the tour takes a few seconds
_CALL_TIMEOUT = 30.0  # every call but the runaway one: never reached, however busy the host
_STOP_TIMEOUT = 30.0  # safety net: how long a worker corral decided to stop may take to go

E = TypeVar("E", bound=BaseException)


class Pace(NamedTuple):
    """How long the tour's timed steps take."""

    runaway_timeout: float  # the runaway call's own timeout: its worker is killed then
    # No worker may sit idle this long before step 6 (or it would expire early): the
    # longest gap is a step 5 (the runaway timeout and a kill), or one worker start.
    idle_ttl: float
    poll_interval: float  # between another tenant's calls while one is watched


_NORMAL = Pace(runaway_timeout=1.0, idle_ttl=5.0, poll_interval=0.2)
_FAST = Pace(runaway_timeout=0.5, idle_ttl=3.0, poll_interval=0.1)


class DemoFailed(Exception):
    """A step of the tour did not behave as it says it should."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``corral demo``'s options to its subparser."""
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"shorter timeouts and waits (the runaway call's timeout {_FAST.runaway_timeout}s, "
        f"idle_ttl={_FAST.idle_ttl}s), for CI",
    )
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how workers start (default: forkserver)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the tour; 0 if every step behaved as expected, else 1 with the reason on stderr."""
    pace = _FAST if args.fast else _NORMAL
    out: TextIO = sys.stdout
    handler = logging.StreamHandler(out)
    handler.setFormatter(InlineLogFormatter(indent=" " * 6, since=time.monotonic()))
    try:
        with corral_logs(handler, logging.INFO):
            elapsed = asyncio.run(_tour(_Screen(out), pace, args.start_method))
    except DemoFailed as exc:
        out.flush()
        print(f"\ncorral demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"\nAll {len(_STEPS)} steps behaved as expected ({elapsed:.1f}s).", file=out)
    return 0


# -- showing it ----------------------------------------------------------------------------------


class InlineLogFormatter(logging.Formatter):
    """One short line per corral log record: ``[elapsed] source: message  [tenant pid]``.

    Args:
        indent: put before every line.
        since: a ``time.monotonic()`` value; lines show seconds since then. None: no time.
    """

    def __init__(self, *, indent: str = "", since: float | None = None) -> None:
        super().__init__()
        self._indent = indent
        self._since = since

    def format(self, record: logging.LogRecord) -> str:
        # Records are formatted as they are emitted, so the monotonic clock here is the
        # event's time (record.created is wall-clock time).
        stamp = "" if self._since is None else f"{time.monotonic() - self._since:6.2f}s "
        source = "worker output" if record.name == "corral.worker" else record.name
        level = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
        # corral passes the tenant and pid as `extra`, so they are record attributes; most
        # of its lines also say them (tenant=... pid=...), and then they are not repeated.
        message = record.getMessage()
        where = []
        if (tenant := getattr(record, "tenant", None)) and f"tenant={tenant}" not in message:
            where.append(str(tenant))
        if (pid := getattr(record, "pid", None)) and f"pid={pid}" not in message:
            where.append(f"pid {pid}")
        line = f"{self._indent}{stamp}{source}: {level}{message}"
        if where:
            line += f"  [{' '.join(where)}]"
        if record.exc_info:
            line += "\n" + textwrap.indent(self.formatException(record.exc_info), self._indent)
        return line


@contextlib.contextmanager
def corral_logs(handler: logging.Handler, level: int) -> Iterator[None]:
    """Route the ``corral`` logger (and ``corral.worker`` below it) to ``handler`` at
    ``level`` or above, and nowhere else, until the block ends; then restore it."""
    logger = logging.getLogger("corral")
    saved = (logger.level, logger.propagate)
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _Screen:
    """Where the tour prints: numbered headings, then what was done and what corral did."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def heading(self, number: int, title: str, why: str) -> None:
        self._print(f"\n[{number}] {title}")
        for line in textwrap.wrap(why, width=88):
            self._print(f"    {line}")

    def say(self, text: str) -> None:
        self._print(f"    {text}")

    def ok(self, text: str) -> None:
        self._print(f"    ok: {text}")

    def _print(self, text: str) -> None:
        # Flushed line by line so that a pipe (CI, `| tee`) sees events as they happen.
        print(text, file=self._out, flush=True)


def _show_call(tenant: str, method: str, args: tuple[Any, ...]) -> str:
    return f"{tenant}.{method}({', '.join(repr(a) for a in args)})"


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- the tour ------------------------------------------------------------------------------------


class _Tour:
    """What the steps share: the supervisor, the screen, the pace, and the pids seen so far."""

    def __init__(
        self,
        sup: corral.Supervisor,
        screen: _Screen,
        pace: Pace,
        stops: _Stops,
        versions: dict[str, str],
    ) -> None:
        self.sup = sup
        self.screen = screen
        self.pace = pace
        self.stops = stops
        self.versions = versions  # what the supervisor's policy says: {"now": "1"}
        # tenant -> pid of its first worker, e.g. {"alice": 4312}
        self.first_pid: dict[str, int] = {}

    def pid(self, tenant: str) -> int | None:
        """The pid of ``tenant``'s worker, from ``stats()``; None if it has none."""
        for worker in self.sup.stats().workers:
            if worker.tenant == tenant:
                return worker.pid
        return None

    async def call(self, tenant: str, method: str, *args: Any) -> Any:
        """Make a call that should succeed, and show it with the pid that served it."""
        value = await self.sup.call(tenant, method, *args)
        pid = self.pid(tenant)
        self.screen.say(f"{_show_call(tenant, method, args)} -> {value!r}   [pid {pid}]")
        if pid is not None:
            self.first_pid.setdefault(tenant, pid)
        return value

    async def fail(self, kind: type[E], tenant: str, method: str, *args: Any) -> E:
        """Make a call that should raise ``kind``, and show the error."""
        shown = _show_call(tenant, method, args)
        try:
            value = await self.sup.call(tenant, method, *args)
        except kind as exc:
            self.screen.say(f"{shown} raised {_error_line(exc)}")
            return exc
        raise DemoFailed(f"{shown} should raise {kind.__name__}, but returned {value!r}")

    async def fail_typed(
        self, kind: type[E], tenant: str, method: str, result_type: type[Any]
    ) -> E:
        """A call with a ``result_type`` that should raise ``kind``; shows the error."""
        shown = f"call({tenant!r}, {method!r}, result_type={result_type.__name__})"
        try:
            value = await self.sup.call(tenant, method, result_type=result_type)
        except kind as exc:
            self.screen.say(f"{shown} raised {_error_line(exc)}")
            return exc
        raise DemoFailed(f"{shown} should raise {kind.__name__}, but returned {value!r}")

    def keys(self, expected: list[str]) -> None:
        """Show ``keys()`` and check it is ``expected`` (order included: LRU first)."""
        keys = self.sup.keys()
        self.screen.say(f"keys() -> {keys}")
        _expect(keys == expected, f"keys() should be {expected}, got {keys}")

    async def gone(self, tenant: str, pid: int | None, reason: str, within: float) -> float:
        """Wait for corral's ``stopped`` event for ``tenant``'s worker ``pid`` and check
        its reason. Returns the monotonic time it was seen. Raises DemoFailed if it does
        not come within ``within`` seconds (a safety net, not a measurement)."""
        try:
            async with asyncio.timeout(within):
                event = await self.stops.wait(pid)
        except TimeoutError:
            raise DemoFailed(
                f"{tenant}'s worker (pid {pid}) was still there after {within:.0f}s: "
                f"{self.sup.stats().workers}"
            ) from None
        seen = time.monotonic()
        _expect(
            event.reason == reason,
            f"{tenant}'s worker stopped for {event.reason!r}, expected {reason!r}: {event}",
        )
        _expect(tenant not in self.sup.keys(), f"{tenant} is still listed after its stop")
        return seen


class _Stops:
    """The supervisor's ``on_event`` hook: keeps every ``stopped`` event, for the tour to
    wait on (a worker that is gone was removed from ``keys()`` before its event)."""

    def __init__(self) -> None:
        self.seen: list[corral.WorkerStopped] = []
        self._changed = asyncio.Event()

    def __call__(self, event: corral.WorkerEvent) -> None:
        if isinstance(event, corral.WorkerStopped):
            self.seen.append(event)
            self._changed.set()

    async def wait(self, pid: int | None) -> corral.WorkerStopped:
        """The ``stopped`` event of worker ``pid``, once there is one."""
        while True:
            self._changed.clear()
            for event in self.seen:
                if event.pid == pid:
                    return event
            await self._changed.wait()


def _expect(condition: bool, failure: str) -> None:
    if not condition:
        raise DemoFailed(failure)


async def _four_tenants(t: _Tour) -> None:
    for tenant, colour in (("alice", "red"), ("bob", "blue"), ("carol", "green")):
        await t.call(tenant, "put", "colour", colour)
    t.keys(["alice", "bob", "carol"])
    t.screen.say("all three slots are taken; now a fourth tenant, dave, makes a call:")
    await t.call("dave", "put", "colour", "yellow")
    t.keys(["bob", "carol", "dave"])
    t.screen.ok(
        "alice, the least recently used, was stopped (her kernel's shutdown() ran) for dave"
    )


async def _own_process(t: _Tour) -> None:
    seen: dict[str, int] = {}
    for tenant, colour in (("bob", "blue"), ("carol", "green"), ("dave", "yellow")):
        value = await t.call(tenant, "get", "colour")
        _expect(value == colour, f"{tenant}.get('colour') should be {colour!r}, got {value!r}")
        me = await t.call(tenant, "whoami")
        _expect(me["pid"] == t.pid(tenant), f"whoami() says pid {me['pid']}, stats() disagrees")
        seen[tenant] = me["pid"]
    pids = {*seen.values(), t.first_pid["alice"]}
    _expect(len(pids) == 4, f"four tenants should have had four pids, saw {sorted(pids)}")
    _expect(os.getpid() not in pids, "a kernel ran in the demo's own process")
    t.screen.ok(
        f"four tenants, four processes {sorted(pids)}, none of them this one ({os.getpid()})"
    )


async def _kernel_error(t: _Tour) -> None:
    pid = t.pid("bob")
    exc = await t.fail(corral.KernelError, "bob", "get", "shoe size")
    _expect(exc.remote_type == "builtins.KeyError", f"remote_type is {exc.remote_type!r}")
    t.screen.say(f"  remote_type={exc.remote_type!r}; the remote traceback is in .remote_traceback")
    await t.call("bob", "get", "colour")
    _expect(t.pid("bob") == pid, f"bob's worker changed from pid {pid} to {t.pid('bob')}")
    t.screen.ok(f"bob's worker (pid {pid}) is still up, notes intact")


async def _crash(t: _Tour) -> None:
    old = t.pid("carol")
    exc = await t.fail(corral.WorkerCrashedError, "carol", "crash", 7)
    t.screen.say(f"  exitcode={exc.exitcode}, signal={exc.signal}, pid={exc.pid}")
    _expect(exc.exitcode == 7, f"exitcode should be 7, got {exc.exitcode}")
    _expect(exc.pid == old, f"the error names pid {exc.pid}, carol's worker was {old}")
    t.screen.say("carol's next call starts a new worker:")
    me = await t.call("carol", "whoami")
    _expect(me["pid"] != old, f"carol's worker should have a new pid, still {old}")
    _expect(me["notes"] == 0, f"a new worker should start blank, it has {me['notes']} notes")
    t.screen.ok(f"pid {old} -> {me['pid']}; carol's notes died with the old process")


async def _runaway(t: _Tour) -> None:
    timeout = t.pace.runaway_timeout
    spin = 20 * timeout
    dave, bob = t.pid("dave"), t.pid("bob")
    shown = f"invoke('dave', 'spin', ({spin},), timeout={timeout})"
    t.screen.say(f"{shown} starts; bob keeps calling whoami() meanwhile")
    answers: list[float] = []  # seconds each of bob's calls took

    async def ask_bob_meanwhile() -> None:
        # Its first call is sent before dave's can have timed out (this task's first step
        # is queued before any timer can fire), so bob makes at least one call meanwhile.
        while not runaway.done():
            asked = time.monotonic()
            await t.sup.call("bob", "whoami")
            answers.append(time.monotonic() - asked)
            await asyncio.sleep(t.pace.poll_interval)  # pacing, not a wait for anything

    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        runaway = tg.create_task(_outcome(t.sup.invoke("dave", "spin", (spin,), timeout=timeout)))
        meanwhile = tg.create_task(_outcome(ask_bob_meanwhile()))
    took = time.monotonic() - started
    exc = runaway.result()
    if not isinstance(exc, corral.CallTimeoutError):
        raise DemoFailed(f"{shown} should raise CallTimeoutError, got {exc!r}")
    if meanwhile.result() is not None:
        raise DemoFailed(f"bob failed while dave's call ran away: {meanwhile.result()!r}")
    t.screen.say(f"{shown} raised {_error_line(exc)}   (after {took:.2f}s)")
    _expect(exc.pid == dave, f"the error names pid {exc.pid}, dave's worker was {dave}")
    t.screen.say(
        f"meanwhile bob made {len(answers)} calls [pid {t.pid('bob')}], all answered, "
        f"the slowest in {max(answers, default=0) * 1000:.1f} ms"
    )
    _expect(len(answers) >= 1, "bob made no call while dave's call ran away")
    _expect(t.pid("bob") == bob, f"bob's worker changed from pid {bob} to {t.pid('bob')}")
    await t.gone("dave", dave, "timeout", within=_STOP_TIMEOUT)
    t.keys(["carol", "bob"])
    t.screen.ok(f"dave's worker (pid {dave}) was killed; the other tenants never noticed")


async def _idle_ttl(t: _Tour) -> None:
    ttl = t.pace.idle_ttl
    asked = time.monotonic()  # carol's worker turns idle after this
    await t.call("carol", "put", "colour", "green")
    carol, bob = t.pid("carol"), t.pid("bob")
    t.screen.say(f"carol now stays quiet; bob calls every {t.pace.poll_interval}s meanwhile")
    bob_calls = 0
    carol_gone = asyncio.Event()

    async def keep_bob_busy() -> None:
        nonlocal bob_calls
        while not carol_gone.is_set():
            await t.sup.call("bob", "whoami")
            bob_calls += 1
            with contextlib.suppress(TimeoutError):  # pacing: the next call, or carol is gone
                async with asyncio.timeout(t.pace.poll_interval):
                    await carol_gone.wait()

    async def watch_carol() -> float | DemoFailed:
        try:
            return await t.gone("carol", carol, "idle_ttl", within=ttl + _STOP_TIMEOUT)
        except DemoFailed as exc:
            return exc
        finally:
            carol_gone.set()

    async with asyncio.TaskGroup() as tg:
        watched = tg.create_task(watch_carol())
        meanwhile = tg.create_task(_outcome(keep_bob_busy()))
    seen = watched.result()
    if isinstance(seen, DemoFailed):
        raise seen
    if meanwhile.result() is not None:
        raise DemoFailed(f"bob failed while carol was idle: {meanwhile.result()!r}")
    waited = seen - asked
    t.screen.say(f"carol's worker was gone {waited:.2f}s after her last call; bob made {bob_calls}")
    # By construction: her worker was idle only once the call made after `asked` returned.
    _expect(waited >= ttl, f"carol's worker went after {waited:.2f}s, before idle_ttl={ttl}s")
    _expect(t.pid("bob") == bob, f"bob's worker changed from pid {bob} to {t.pid('bob')}")
    t.keys(["bob"])
    t.screen.ok(f"idle past idle_ttl={ttl}s, carol's worker was stopped; bob's, in use, stayed")


async def _evict(t: _Tour) -> None:
    first = t.first_pid["alice"]
    t.screen.say(f"alice, LRU-evicted in step 1 (pid {first}), comes back:")
    me = await t.call("alice", "whoami")
    _expect(me["pid"] != first, f"alice should have a new worker, still pid {first}")
    _expect(me["notes"] == 0, f"alice's new worker should be blank, has {me['notes']} notes")
    t.keys(["bob", "alice"])
    bob = t.pid("bob")
    evicted = await t.sup.evict("bob")
    t.screen.say(f"evict('bob') -> {evicted}")
    _expect(evicted, "evict('bob') should return True: bob had a worker")
    again = await t.sup.evict("bob")
    t.screen.say(f"evict('bob') -> {again}   (nothing left to evict)")
    _expect(not again, "a second evict('bob') should return False")
    t.keys(["alice"])
    t.screen.ok(f"bob's worker (pid {bob}) shut down cleanly on request; alice starts over, blank")


_MEMORY_LIMIT_MIB = 256


async def _memory_recycle(t: _Tour) -> None:
    alice = t.pid("alice")
    grown = await t.call("alice", "grow", _MEMORY_LIMIT_MIB + 64)
    t.screen.say(
        f"alice now holds {grown / 2**20:.0f} MiB; the sampler looks every 0.25s "
        f"(worker_memory_limit={_MEMORY_LIMIT_MIB} MiB)"
    )
    asked = time.monotonic()
    seen = await t.gone("alice", alice, "memory_limit", within=_STOP_TIMEOUT)
    stops = t.sup.stats().stops
    _expect(stops.get("memory_limit") == 1, f"alice should stop for memory_limit: {stops}")
    t.screen.say(f"alice's worker was replaced {seen - asked:.2f}s later (reason memory_limit)")
    me = await t.call("alice", "whoami")
    _expect(me["pid"] != alice, f"alice should have a new worker, still pid {alice}")
    t.screen.ok(f"pid {alice} -> {me['pid']}: the leak went with the old process")


class Identity(msgspec.Struct):
    """What whoami() returns, as a type the caller checks it against."""

    tenant: str
    pid: int
    notes: int


class WrongIdentity(msgspec.Struct):
    tenant: str
    pid: str  # whoami() sends an int: this does not fit


async def _typed_result(t: _Tour) -> None:
    me = await t.sup.call("alice", "whoami", result_type=Identity)
    t.screen.say(f"call('alice', 'whoami', result_type=Identity) -> {me!r}")
    _expect(isinstance(me, Identity), f"expected an Identity, got {type(me).__name__}")
    exc = await t.fail_typed(corral.ResultTypeError, "alice", "whoami", WrongIdentity)
    _expect("$.pid" in str(exc), f"the error should say where: {exc}")
    _expect(t.pid("alice") == me.pid, "alice's worker should be the same after the mismatch")
    t.screen.ok(f"the reply that did not fit was refused; alice's worker (pid {me.pid}) serves on")


async def _reload(t: _Tour) -> None:
    old = t.pid("alice")
    t.versions["now"] = "2"
    t.screen.say("the policy now says version '2' for every tenant; reload('alice'):")
    info = await t.sup.reload("alice")
    if info is None or info.version != "2":
        raise DemoFailed(f"reload('alice') should give a worker of version '2', got {info}")
    t.screen.say(f"reload('alice') -> pid {info.pid}, version {info.version!r}")
    async with asyncio.timeout(_STOP_TIMEOUT):  # (a safety net: it drains at once)
        stopped = await t.stops.wait(old)
    _expect(stopped.reason == "reloaded", f"the old worker stopped for {stopped.reason!r}")
    me = await t.call("alice", "whoami")
    _expect(me["pid"] == info.pid != old, f"alice should be served by pid {info.pid}: {me}")
    t.screen.ok(f"pid {old} -> {info.pid}: new calls went to the new worker; the old one drained")


async def _stats(t: _Tour) -> None:
    # RSS is sampled every memory_check_interval; give alice's young worker one sample.
    for _ in range(20):  # up to 1s; the API has no "sampled" event to wait for
        if all(w.rss is not None for w in t.sup.stats().workers):
            break
        await asyncio.sleep(0.05)
    stats = t.sup.stats()
    t.screen.say(f"state={stats.state!r}  max_workers={stats.max_workers}  starts={stats.starts}")
    t.screen.say(f"{'tenant':<8} {'pid':>7}  {'state':<8} {'requests':>8}  {'rss':>8}")
    for w in stats.workers:
        rss = "-" if w.rss is None else f"{w.rss / 2**20:.1f} MiB"
        t.screen.say(f"{w.tenant:<8} {w.pid or '-':>7}  {w.state:<8} {w.requests:>8}  {rss:>8}")
    t.screen.say(
        "stops by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.stops.items()))
    )
    expected = {"lru": 1, "crashed": 1, "timeout": 1, "idle_ttl": 1, "evicted": 1}
    expected |= {"memory_limit": 1, "reloaded": 1}
    _expect(stats.stops == expected, f"stops should be {expected}, got {stats.stops}")
    _expect(
        stats.starts == 8,
        f"eight workers were started (a, b, c, d, c, a, a, a), stats says {stats.starts}",
    )
    t.screen.say("leaving 'async with' closes the supervisor and stops every worker:")
    await t.sup.aclose()
    closed = t.sup.stats()
    _expect(closed.state == "closed" and not closed.workers, f"after aclose(): {closed}")
    t.screen.ok("every worker corral started is gone")


async def _outcome(call: Awaitable[Any]) -> Any:
    """The call's value or its corral error: an error is a result to show, and must not
    make the TaskGroup cancel the other task."""
    try:
        return await call
    except corral.CorralError as exc:
        return exc


class _Step(NamedTuple):
    title: str
    why: str
    run: Callable[[_Tour], Awaitable[None]]


_STEPS = (
    _Step(
        "Four tenants, three worker slots",
        "Each tenant's kernel runs in a worker process of its own, started on first use; "
        "with max_workers=3 a fourth tenant makes room by stopping the least recently used.",
        _four_tenants,
    ),
    _Step(
        "Each tenant's state lives in its own process",
        "A kernel's notes are plain Python objects in its worker's memory; "
        "whoami() reports the pid from inside the worker.",
        _own_process,
    ),
    _Step(
        "A kernel raises",
        "An exception in the kernel comes back as KernelError (type, message, traceback as "
        "text); the worker is fine and keeps serving.",
        _kernel_error,
    ),
    _Step(
        "A worker crashes",
        "crash(7) calls os._exit(7), as broken native code might: the caller gets "
        "WorkerCrashedError with the exit code, and the next call starts a new worker.",
        _crash,
    ),
    _Step(
        "A runaway call",
        "A busy loop cannot be interrupted from inside, so past the call's timeout (here its "
        "own, shorter than call_timeout) corral kills its worker (CallTimeoutError); other "
        "tenants' workers are not affected.",
        _runaway,
    ),
    _Step(
        "Idle workers expire",
        "corral stops a worker nobody has called for idle_ttl seconds, without being asked.",
        _idle_ttl,
    ),
    _Step(
        "Evicting on request",
        "evict(tenant) stops that tenant's worker and waits until it is gone; its kernel's "
        "shutdown() runs first (its output appears in corral's log).",
        _evict,
    ),
    _Step(
        "A leaking worker is recycled",
        "A kernel that keeps memory across calls grows past worker_memory_limit: at the "
        "next sample corral replaces its worker (after its calls in flight finish).",
        _memory_recycle,
    ),
    _Step(
        "A typed result",
        "result_type= decodes the kernel's reply strictly into a type of the caller's (here "
        "a msgspec Struct); a reply that does not fit is a ResultTypeError, and the worker "
        "is fine.",
        _typed_result,
    ),
    _Step(
        "A rolling reload",
        "reload(tenant) starts a worker anew (its policy asked again: here a new version) "
        "beside the old one, swaps it in, and lets the old one finish its calls.",
        _reload,
    ),
    _Step(
        "stats(), then closing",
        "A snapshot of every worker (least recently used first) and why each earlier one stopped.",
        _stats,
    ),
)


async def _tour(screen: _Screen, pace: Pace, start_method: str) -> float:
    """Run every step on one supervisor; returns the seconds it took."""
    started = time.monotonic()
    screen.say(f"corral {corral.__version__} demo on {FACTORY} (a tiny per-tenant notebook)")
    screen.say(
        f"Supervisor(max_workers=3, idle_ttl={pace.idle_ttl}, call_timeout={_CALL_TIMEOUT}, "
        f"worker_memory_limit={_MEMORY_LIMIT_MIB} MiB, start_method={start_method!r})"
    )
    screen.say("Indented, time-stamped lines are corral's own log as it happens;")
    screen.say("'worker output' lines are what a worker printed.")
    stops = _Stops()
    versions = {"now": "1"}
    sup = corral.Supervisor(
        FACTORY,
        max_workers=3,
        idle_ttl=pace.idle_ttl,
        call_timeout=_CALL_TIMEOUT,
        worker_memory_limit=_MEMORY_LIMIT_MIB * 2**20,
        memory_check_interval=0.25,  # so that stats() shows an RSS for young workers
        start_method="spawn" if start_method == "spawn" else "forkserver",
        on_event=stops,
        policy=lambda tenant: corral.TenantPolicy(version=versions["now"]),
    )
    timer = asyncio.timeout(_TOTAL_TIMEOUT)
    try:
        async with timer, sup:
            tour = _Tour(sup, screen, pace, stops, versions)
            for number, step in enumerate(_STEPS, 1):
                screen.heading(number, step.title, step.why)
                try:
                    await step.run(tour)
                except DemoFailed as exc:
                    raise DemoFailed(f"step {number} ({step.title}): {exc}") from None
                except corral.CorralError as exc:
                    raise DemoFailed(
                        f"step {number} ({step.title}): unexpected {_error_line(exc)}"
                    ) from exc
    except TimeoutError:
        if timer.expired():
            raise DemoFailed(f"the tour did not finish within {_TOTAL_TIMEOUT}s") from None
        raise
    return time.monotonic() - started
