"""Edge cases and regressions of the supervisor core, with real processes throughout.

* ``xfail(strict=True)``: a known limitation still present; the test must keep
  failing until it is fixed (then drop the marker).
* Unmarked tests marked "# Regression:": they failed
  before the fix they guard.
* The other unmarked tests pin down tricky paths that work.

Kernels used here live in this module (workers import it by name)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import msgspec
import psutil
import pytest

import corral
from corral import Sandbox, Supervisor
from corral.supervisor import DEFAULT_ENV_ALLOWLIST
from corral.supervisor._memory import MemorySample
from corral.supervisor._process import (
    ExitCallback,
    Launcher,
    SpawnedProcess,
    WardenLauncher,
)
from corral.supervisor.records import LayerStatus
from tests import helpers
from tests.helpers import (
    EventLog,
    K,
    open_fds,
    pid_gone,
    run_host,
    wait_pid_gone,
    wait_until,
    within,
    worker_info,
)
from tests.kernels import Kernel

HERE = "tests.supervisor.test_edge_cases"
EVIL = f"{HERE}:make_evil"
FAST: dict[str, Any] = {**helpers.FAST, "drain_timeout": 0.5}


# -- kernels (run in the worker) ---------------------------------------------------------------


_FOREVER = "import time; time.sleep(3600)"  # ok-sleep: the workload of a test process


class EvilKernel(Kernel):
    def bad_result(self, call_id: int) -> str:
        """Reply to our own call with a Result whose envelope is valid msgpack but whose
        value is a str with invalid UTF-8; then let the loop send the real reply too."""
        from corral.ipc import Result, encode_frame

        os.write(4, bytes(encode_frame(Result(call_id, msgspec.Raw(b"\xa1\xff")))))
        return "real"

    def fail_surrogate(self) -> None:
        # e.g. an OSError about a filename that os.listdir() surrogate-escaped
        raise ValueError("no such file: b\udcffd.txt")

    async def async_fail_surrogate(self) -> None:
        raise ValueError("no such file: b\udcffd.txt")

    async def raise_cancelled(self) -> None:
        raise asyncio.CancelledError

    def raise_cancelled_sync(self) -> None:
        raise asyncio.CancelledError

    @property
    def status(self) -> Any:
        raise RuntimeError("a property that fails when looked up")

    def start_nested_detached(self) -> int:
        """worker -> A (own session, stays alive) -> G (A's plain child). Returns G's pid."""
        import subprocess
        import sys

        code = (
            "import subprocess, sys, time;"
            f"g = subprocess.Popen([sys.executable, '-c', {_FOREVER!r}]);"
            f"print(g.pid, flush=True); {_FOREVER}"
        )
        self._a = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self._a.stdout is not None
        return int(self._a.stdout.readline())

    def close_requests(self) -> bool:
        os.close(3)  # the request pipe; fd 4 (replies) stays open, the process lives on
        return True


def make_evil(tenant: str) -> EvilKernel:
    return EvilKernel(tenant)


# -- helpers -----------------------------------------------------------------------------------


def local_launcher() -> WardenLauncher:
    """The launcher a Supervisor with FAST makes by default (forkserver, the default
    sandbox, the default environment), made here so that the test holds it: its
    ``warden_pid``, its ``aclose()``, and in one regression test its warden's state."""
    env = {name: os.environ[name] for name in DEFAULT_ENV_ALLOWLIST if name in os.environ}
    return WardenLauncher(
        exec_workers=False,
        env=env,
        start_timeout=FAST["start_timeout"],
        sandbox=Sandbox.default(),
    )


def taskgroup_died(sup: Supervisor) -> bool:
    """Whether the supervisor's TaskGroup has ended (a bug: it runs until aclose()). The
    regressions below check for it to fail fast, and to clean up without aclose(), which
    would hang; nothing public tells."""
    return sup._runner is not None and sup._runner.done()


async def pid_of(sup: Supervisor, tenant: str) -> int:
    return int((await sup.call(tenant, "whoami"))["pid"])


def pids_of(sup: Supervisor, tenant: str) -> list[int]:
    return [w.pid for w in sup.stats().workers if w.tenant == tenant and w.pid is not None]


# -- (a)/(d): a reply the supervisor cannot decode is never resolved ---------------------------


# Regression: Result value with invalid UTF-8 raises
# UnicodeDecodeError (not caught in handle._on_message) after _complete() popped the call: the
# caller hangs forever, its timeout timer is cancelled, and the worker is not killed
async def test_undecodable_result_value_resolves_the_call_with_a_protocol_error() -> None:
    async with Supervisor(EVIL, **FAST) as sup:
        try:
            async with asyncio.timeout(30):  # a hang guard (the bug was a hang)
                # The first call on a fresh worker has id 1.
                call = asyncio.create_task(sup.invoke("t", "bad_result", (1,), timeout=20))
                with pytest.raises(corral.ProtocolError):
                    await call
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
            for pid in pids_of(sup, "t"):  # leave nothing behind even while the bug is present
                os.kill(pid, signal.SIGKILL)


# -- (a): the worker loop drops a call without replying ------------------------------------------


async def _expect_within(coro: Any, seconds: float) -> Any:
    """Run ``coro`` as a task; cancel it (and wait) if it does not finish in time."""
    task = asyncio.ensure_future(coro)
    try:
        async with asyncio.timeout(seconds):
            return await asyncio.shield(task)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# Regression: worker/_loop._send_failure encodes the kernel's
# message/traceback as-is; a lone surrogate makes encode_frame raise UnicodeEncodeError inside the
# reader callback, no reply is ever sent: the call hangs (timeout=None) or, with a timeout, the
# healthy worker is killed and the caller gets CallTimeoutError
@pytest.mark.parametrize("method", ["fail_surrogate", "async_fail_surrogate"])
async def test_kernel_error_with_a_surrogate_in_its_message_is_reported(method: str) -> None:
    async with Supervisor(EVIL, **FAST) as sup:
        with pytest.raises(corral.KernelError):
            await _expect_within(sup.invoke("t", method, timeout=None), 30)


# Regression: worker/_loop: _await_reply/_dispatch catch
# Exception only and _lookup's getattr() is unguarded: a CancelledError from the kernel (async or
# sync) or a property that raises on lookup escapes without a reply (a sync escape also drops the
# rest of the read batch): the call hangs (timeout=None) or its healthy worker is killed at the
# timeout
@pytest.mark.parametrize("method", ["raise_cancelled", "raise_cancelled_sync", "status"])
async def test_the_worker_replies_to_every_call(method: str) -> None:
    async with Supervisor(EVIL, **FAST) as sup:
        with pytest.raises((corral.KernelError, corral.InvalidCallError)):
            await _expect_within(sup.invoke("t", method, timeout=None), 30)


# Regression: _PipeWriter swallows EPIPE (sets _broken) and never
# tells the handle: a worker that closed its request pipe but lives on silently drops every later
# call (hang with timeout=None; with a timeout the call times out instead of failing fast)
async def test_worker_that_closes_its_request_pipe_fails_calls_fast() -> None:
    async with Supervisor(EVIL, **FAST) as sup:
        assert await sup.call("t", "close_requests") is True
        with pytest.raises(corral.WorkerError):
            await _expect_within(sup.invoke("t", "echo", (1,), timeout=None), 30)


class _ExitOnKill:
    """The real launcher, except that ``signal(SIGKILL)`` reports the worker reaped before
    it returns (the Launcher protocol allows it; the warden reports exits later)."""

    def __init__(self, inner: Launcher) -> None:
        self._inner = inner
        self._on_exit: dict[int, ExitCallback] = {}

    @property
    def memory_enforcement(self) -> str:
        return self._inner.memory_enforcement

    @property
    def sandbox_report(self) -> dict[str, LayerStatus]:
        return self._inner.sandbox_report

    @property
    def warden_pid(self) -> int | None:
        return self._inner.warden_pid

    @property
    def pid_namespaces(self) -> bool:
        return self._inner.pid_namespaces

    def memory_leaves(self) -> dict[int, str]:
        return self._inner.memory_leaves()

    async def start(self) -> None:
        await self._inner.start()

    async def spawn(
        self, on_exit: ExitCallback, memory_limit: int | None, sandbox: Sandbox | None = None
    ) -> SpawnedProcess:
        reported: list[bool] = []

        def once(returncode: int | None, oom_killed: bool) -> None:
            if not reported:
                reported.append(True)
                on_exit(returncode, oom_killed)

        proc = await self._inner.spawn(once, memory_limit, sandbox)
        self._on_exit[proc.pid] = once
        return proc

    def signal(self, pid: int, signum: int) -> None:
        self._inner.signal(pid, signum)
        if signum == signal.SIGKILL and pid in self._on_exit:
            self._on_exit.pop(pid)(-signal.SIGKILL, False)

    async def aclose(self, grace: float = 5.0) -> None:
        await self._inner.aclose(grace)


def _is_a_launcher(inner: Launcher) -> Launcher:
    return _ExitOnKill(inner)  # (for the type checker: the whole protocol is there)


# Regression: a call is booked after its frame is written; when the write found the pipe
# broken and the launcher reported the kill's exit on the spot, the call was booked on a
# dead worker and never resolved (a hang with timeout=None).
async def test_a_call_whose_worker_is_reported_dead_while_it_is_sent_still_fails() -> None:
    async with Supervisor(EVIL, launcher=_ExitOnKill(local_launcher()), **FAST) as sup:
        assert await sup.call("t", "close_requests") is True
        with pytest.raises(corral.WorkerCrashedError, match="closed its pipe"):
            await _expect_within(sup.invoke("t", "echo", (1,), timeout=None), 30)


# -- (d): an exception in a background task kills the TaskGroup, and with it the supervisor --------


async def _bury(sup: Supervisor, launcher: Launcher) -> None:
    """Clean up after a supervisor whose TaskGroup died (its aclose() would hang on the
    dead group): the launcher's own aclose() ends the warden and with it every worker;
    then the supervisor's tasks and the memory probe's thread, which only its aclose()
    would end."""
    await within(launcher.aclose(grace=0.0), 10)
    for task in (sup._closing, sup._runner):
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    await sup._memory.aclose()


def _close_unstarted_coroutines(exc: BaseException) -> None:
    import inspect

    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if inspect.iscoroutine(value) and inspect.getcoroutinestate(value) == "CORO_CREATED":
                value.close()
        tb = tb.tb_next


# Regression: WorkerHandle.start() lets non-LaunchError
# exceptions escape into the supervisor's TaskGroup (process.py: socketpair/os.pipe/pidfd_open
# OSError e.g. EMFILE, Popen ValueError for a NUL in env): the TaskGroup dies, the caller hangs in
# _wait_ready forever, other tenants get RuntimeError and aclose() hangs
@pytest.mark.parametrize("trigger", ["nul-in-env", "emfile"])
async def test_a_spawn_error_fails_the_call_and_the_supervisor_survives(trigger: str) -> None:
    import resource

    env = {"BAD": "a\x00b"} if trigger == "nul-in-env" else {}
    launcher = local_launcher()
    try:
        sup = Supervisor(K, env=env, memory_check_interval=3600, launcher=launcher, **FAST)
    except ValueError:
        assert trigger == "nul-in-env"
        return  # rejected at configuration time: as good as a StartError
    await sup.start()
    try:
        if trigger == "emfile":
            await sup.call("warm", "echo", 1)  # the warden is up; only os.pipe() will fail
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # every new fd: EMFILE
            call = asyncio.ensure_future(sup.call("t", "echo", 1))
            try:
                await wait_until(lambda: call.done() or taskgroup_died(sup))
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        else:
            call = asyncio.ensure_future(sup.call("t", "echo", 1))
        with pytest.raises(corral.StartError):
            await _expect_within(call, 30)
        # ...and the supervisor keeps serving other tenants:
        assert await _expect_within(sup.call("u", "echo", 2), 30) == 2
    finally:
        if taskgroup_died(sup):
            await _bury(sup, launcher)
        else:
            await sup.aclose()


# -- (c): a worker whose exit is reported before spawn() returns leaks its pipes -----------------


def _queued_bytes(sock: Any) -> int:
    import array
    import fcntl
    import termios

    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)  # SEQPACKET: bytes of every queued record
    return buf[0]


# Regression: when WorkerSpawned and WorkerExited arrive in one
# read, handle._on_exit runs before start() resumes; start() then registers the pipes of a DEAD
# handle (no state check), writes Start, arms the start timer and never closes
# to_worker/from_worker
async def test_worker_dead_before_spawn_returns_leaves_no_fds() -> None:
    import time

    from corral.ipc import WorkerExited, WorkerSpawned, encode_record

    launcher = local_launcher()
    async with Supervisor(K, launcher=launcher, memory_check_interval=3600, **FAST) as sup:
        await sup.call("warm", "echo", 1)
        # The warden's link is private state on purpose: the race needs its spawn request
        # sent and not yet answered, which nothing public shows.
        warden_state = launcher._warden
        assert launcher.warden_pid is not None and warden_state is not None
        warden = psutil.Process(launcher.warden_pid)
        known = {c.pid for c in warden.children()}
        fds = open_fds()
        call = asyncio.ensure_future(sup.call("t", "echo", 1))
        await wait_until(lambda: warden_state.pending and not warden_state._outbox)
        (request_id,) = warden_state.pending
        # Block the event loop (on purpose) while the new worker dies and the warden reports
        # both its spawn and its exit: the supervisor then reads the two records in one go.
        deadline = time.monotonic() + 30  # a hang guard, however busy the host
        while not (new := [c.pid for c in warden.children() if c.pid not in known]):
            assert time.monotonic() < deadline, "the warden did not fork"
        (pid,) = new
        os.kill(pid, signal.SIGKILL)
        # Its memory cgroup leaf (as root) is the next after the warm worker's.
        warm_leaf = next(iter(launcher.memory_leaves().values()), None)
        leaf = os.path.join(os.path.dirname(warm_leaf), "w2") if warm_leaf else None
        both = len(encode_record(WorkerSpawned(request_id, pid, leaf))) + len(
            encode_record(WorkerExited(pid, -signal.SIGKILL, False))
        )
        while _queued_bytes(warden_state.sock) < both:
            assert time.monotonic() < deadline, "the warden did not report the exit"
        if request_id not in warden_state.pending:
            pytest.skip("the loop read WorkerSpawned before we blocked it (race lost)")
        try:
            with pytest.raises(corral.StartError):
                await _expect_within(call, 30)
            for _ in range(3):  # let start() resume after the exit was reported
                await asyncio.sleep(0)  # ok-sleep: one loop turn
            assert "t" not in sup
            left = open_fds() - fds
            assert not left, f"the dead worker's pipes were left open: {sorted(left)}"
        finally:  # if the bug is back, release what the dead handle kept open
            loop = asyncio.get_running_loop()
            for fd in open_fds() - fds:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                os.close(fd)


# -- (e): when the warden dies, the workers' own children outlive it -----------------------------


@pytest.mark.parametrize(
    "detach",
    [
        pytest.param(False, id="same-group"),
        pytest.param(
            True,
            id="detached",
            marks=pytest.mark.xfail(
                os.geteuid() != 0,
                reason="LIMITATION of default() without root (no namespaces, no cgroups): a "
                "worker's child in a session of its own is reparented to init when the "
                "warden is SIGKILLed; killpg of the workers' groups does not reach it. As "
                "root the launcher kills what is left in each worker's cgroup leaf. strict() "
                "covers it too: test_strict.py::test_a_killed_warden_takes_every_namespace_with_it",
                strict=True,
            ),
        ),
    ],
)
async def test_a_workers_children_die_when_the_warden_dies(detach: bool) -> None:
    """Once neither kind was killed: workers die with the warden (PDEATHSIG) but
    nothing killed their children, which were orphaned to init. Now the launcher killpg()s
    each worker's group in _on_warden_exit, which covers only the same-group case."""
    child: int | None = None
    launcher, log = local_launcher(), EventLog()
    try:
        async with Supervisor(K, launcher=launcher, on_event=log, **FAST) as sup:
            child = await sup.call("t", "start_child", detach)
            worker = await pid_of(sup, "t")
            warden = launcher.warden_pid
            assert warden is not None
            os.kill(warden, signal.SIGKILL)
            assert (await log.stopped("t")).reason == "warden_died"
            await wait_pid_gone(worker)
            await wait_pid_gone(child)
    finally:
        if child is not None and not pid_gone(child):
            os.kill(child, signal.SIGKILL)


# -- (c): a cancelled start() leaves its runner behind -------------------------------------------


async def test_cancelled_start_then_aclose_leaves_no_background_tasks() -> None:
    sup = Supervisor(K, **FAST)
    starting = asyncio.ensure_future(sup.start())
    # start() has created its runner and waits for it:
    await asyncio.sleep(0)  # ok-sleep: one loop turn
    starting.cancel()  # e.g. the server's startup was cancelled
    try:
        async with asyncio.timeout(10):
            await sup.aclose()  # inline, in this very step: before the runner has run at all
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await asyncio.sleep(0)  # ok-sleep: one loop turn
    finally:
        left = [
            t for t in asyncio.all_tasks() if t.get_name().startswith("corral-") and not t.done()
        ]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, starting, return_exceptions=True)
    assert not left


# -- (a): max_frame_bytes above 64 MiB is accepted but the worker still caps at 64 MiB ----------


# Regression: worker/_loop.read_start builds
# FrameDecoder(ToWorker) with the default 64 MiB cap and WorkerLoop keeps it: with max_frame_bytes
# > 64 MiB a large (valid) call makes the worker exit 2 ('bad frame from supervisor') and the
# caller sees WorkerCrashedError
async def test_max_frame_bytes_above_the_default_is_honoured_by_the_worker() -> None:
    from corral.ipc import DEFAULT_MAX_FRAME_BYTES

    limit = DEFAULT_MAX_FRAME_BYTES + (1 << 20)
    async with Supervisor(K, max_frame_bytes=limit, **FAST) as sup:
        payload = b"x" * (DEFAULT_MAX_FRAME_BYTES + 1024)
        result = await _expect_within(sup.invoke("t", "echo", (payload,), timeout=20), 30)
        assert result == payload


class _FlakyProbe:
    """A probe that fails once (e.g. a transient /proc read error in a custom probe)."""

    def __init__(self) -> None:
        self.calls = 0

    def sample(self, roots: Any, exclude_roots: bool = False) -> MemorySample:
        self.calls += 1
        if self.calls == 1:
            raise OSError("transient /proc failure")
        return MemorySample({}, 1 << 34, 1 << 34)


# Regression: Supervisor._sample_memory does not catch the
# probe's exceptions (ProbeThread hands them to the awaiting task 'which decides'): one failed
# sample kills the TaskGroup; from then on calls for new tenants raise RuntimeError('TaskGroup ...
# is finished')
async def test_a_failing_memory_sample_does_not_take_down_the_supervisor() -> None:
    probe, launcher = _FlakyProbe(), local_launcher()
    sup = Supervisor(K, probe=probe, memory_check_interval=0.01, launcher=launcher, **FAST)
    await sup.start()
    try:
        await sup.call("t", "echo", 1)
        await wait_until(lambda: probe.calls >= 2 or taskgroup_died(sup))
        try:
            assert await _expect_within(sup.call("u", "echo", 2), 30) == 2
        except RuntimeError as exc:
            _close_unstarted_coroutines(exc)  # handle.start() that create_task refused
            raise AssertionError(f"the supervisor is dead: {exc!r}") from None
    finally:
        if taskgroup_died(sup):
            await _bury(sup, launcher)
        else:
            await sup.aclose()


# -- tricky paths that work (kept as regression tests) -------------------------------------------


@pytest.mark.parametrize("when", ["before-pid", "after-pid"])
async def test_evict_while_starting_fails_the_waiters_and_leaves_nothing(when: str) -> None:
    factory = K if when == "before-pid" else "tests.kernels:hang_on_import"
    log = EventLog()
    async with Supervisor(factory, memory_check_interval=3600, on_event=log, **FAST) as sup:
        await sup.call("warm", "echo", 1) if when == "before-pid" else None
        fds = open_fds()
        calls = [asyncio.ensure_future(sup.call("t", "echo", 1)) for _ in range(3)]

        def reached() -> bool:
            if "t" not in sup:
                return False
            return (worker_info(sup, "t").pid is None) == (when == "before-pid")

        async with asyncio.timeout(10):
            await wait_until(reached)
            assert worker_info(sup, "t").state == "starting"
            assert await sup.evict("t") is True
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, corral.StartError) for r in results), results
        assert len({str(r) for r in results}) == 1
        pid = (await log.stopped("t", 0)).pid  # evict() returned: it is gone
        assert "t" not in sup and pid is not None and pid_gone(pid)
        assert open_fds() == fds, "the evicted worker's pipes were left open"


async def test_aclose_while_a_worker_starts_fails_waiters_with_closed_error() -> None:
    sup = Supervisor("tests.kernels:hang_on_import", **FAST)
    await sup.start()
    call = asyncio.ensure_future(sup.call("t", "echo", 1))
    async with asyncio.timeout(10):
        await wait_until(lambda: pids_of(sup, "t"))
        (pid,) = pids_of(sup, "t")
        await sup.aclose()
        with pytest.raises(corral.SupervisorClosedError):
            await call
    assert pid_gone(pid)


async def test_warden_death_fails_in_flight_calls_and_a_new_warden_serves() -> None:
    launcher = local_launcher()
    async with Supervisor(K, launcher=launcher, **FAST) as sup:
        held = asyncio.ensure_future(sup.call("t", "hold", "g"))
        await sup.call("t", "wait_entered", "g")
        warden = launcher.warden_pid
        assert warden is not None
        os.kill(warden, signal.SIGKILL)
        async with asyncio.timeout(10):
            with pytest.raises(corral.WorkerCrashedError, match="warden"):
                await held
            assert await sup.call("t", "echo", 2) == 2
        assert launcher.warden_pid not in (None, warden)


async def test_racing_calls_evicts_ttl_and_close_resolve_and_never_overlap_workers() -> None:
    """One tenant, hammered by calls, evicts and a very short TTL, then closed mid-flight:
    every call resolves (a value or a typed corral error), and the warden never has two
    live workers at once."""
    launcher = local_launcher()
    sup = Supervisor(K, idle_ttl=0.005, shutdown_timeout=0.5, term_timeout=0.5, launcher=launcher)
    await sup.start()
    overlap: list[list[int]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            warden = launcher.warden_pid
            if warden is not None:
                try:
                    live = [
                        c.pid
                        for c in psutil.Process(warden).children()
                        if c.status() != psutil.STATUS_ZOMBIE
                    ]
                except psutil.Error:
                    live = []
                if len(live) > 1:
                    overlap.append(live)
            await asyncio.sleep(0)  # ok-sleep: one loop turn

    async def caller(i: int) -> Any:
        if i % 5 == 0:
            return await sup.evict("t")
        return await sup.call("t", "async_echo", i, delay=0.001 * (i % 3))

    watcher = asyncio.ensure_future(watch())
    try:
        async with asyncio.timeout(30):
            for _ in range(5):
                results = await asyncio.gather(
                    *(caller(i) for i in range(40)), return_exceptions=True
                )
                for i, r in enumerate(results):
                    assert r == i or isinstance(r, bool | corral.CorralError), (i, r)
            tail = [asyncio.ensure_future(caller(i)) for i in range(1, 20)]
            await asyncio.sleep(0)  # ok-sleep: one loop turn
            await sup.aclose()
            for r in await asyncio.gather(*tail, return_exceptions=True):
                assert isinstance(r, int | bool | corral.CorralError), r
    finally:
        stop.set()
        await watcher
        await sup.aclose()
    assert not overlap, overlap[:3]
    stats = sup.stats()
    assert stats.starts >= 5 and stats.stops.get("evicted", 0) >= 1, stats  # it did churn


# -- (c): the memory probe thread is not a daemon: a host that did not aclose() cannot exit --------

_HOST_WITHOUT_ACLOSE = """
import asyncio, corral

async def main():
    sup = corral.Supervisor("tests.kernels:make", memory_check_interval=0.05)
    await sup.start()
    await sup.call("t", "echo", 1)
    while sup.stats().workers[0].rss is None:  # sampled: the probe thread is running
        await asyncio.sleep(0.01)  # ok-sleep: polling a condition in the host script

asyncio.run(main())  # e.g. the server's main() raised before it closed the supervisor
print("main returned", flush=True)
"""


# Regression: memory.ProbeThread starts a non-daemon thread that
# only aclose() stops: if aclose() never runs or never reaches it (forgotten, TaskGroup crashed,
# aclose hung), the host process hangs forever at interpreter exit
def test_host_that_never_closed_the_supervisor_can_still_exit() -> None:
    out, code = run_host(_HOST_WITHOUT_ACLOSE, timeout=30)  # a hang guard
    assert code is not None, "the host hung at exit (the corral-probe thread is still running)"
    assert "main returned" in out and code == 0


# -- (e)/(c): the warden's orphan sweep is one level deep ----------------------------------------


# Regression: after a worker exits, _warden._reap kills its
# process group and then only the warden's *direct* non-worker children (_kill_orphans, not
# recursive): a detached child A is killed but A's own child G is reparented to the warden
# afterwards and lives on after evict() returned / the crash was reported, alongside the tenant's
# next worker
@pytest.mark.parametrize("how", ["evict", "crash"])
async def test_a_detached_grandchild_under_a_live_child_is_reaped(how: str) -> None:
    grandchild: int | None = None
    try:
        async with Supervisor(EVIL, **FAST) as sup:
            grandchild = await sup.call("t", "start_nested_detached")
            assert not pid_gone(grandchild)
            if how == "evict":
                await sup.evict("t")
            else:
                with pytest.raises(corral.WorkerCrashedError):
                    await sup.call("t", "crash")
            await wait_pid_gone(grandchild)
    finally:
        if grandchild is not None and not pid_gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# -- (d): restarting the warden while the old one is still exiting ------------------------------

_HOST_WARDEN_RESTART = """
import asyncio, corral
import corral.supervisor._process as process

# As if the warden came from another corral install: every warden is refused after its
# hello and sent SIGTERM; the next call starts a new warden while the old one tears down.
# (A warden start timeout does the same with SIGKILL; that variant hangs about half the time.)
process.PROTOCOL_VERSION = 99

async def main():
    # Every warden speaks the "wrong" version: each spawn replaces the previous warden.
    launcher = process.WardenLauncher(exec_workers=False, env={}, start_timeout=10)
    for i in range(3):
        try:
            await launcher.spawn(lambda code, oom: None, None)
        except process.LaunchError:
            print("LaunchError", flush=True)
    await launcher.aclose()
    print("closed", flush=True)

asyncio.run(main())
"""


def test_a_warden_restart_while_the_old_warden_exits_does_not_freeze_the_loop() -> None:
    """A warden that is replaced (here: it speaks the wrong protocol version) must finish
    exiting before its successor starts, and its exit must only touch its own state:
    once, the old warden's exit closed the new one's pidfd and waited on the live new
    process, blocking the event loop forever."""
    out, code = run_host(_HOST_WARDEN_RESTART, timeout=30)  # a hang guard
    assert code is not None, f"the host's event loop froze; it printed {out!r}"
    assert out.split() == ["LaunchError"] * 3 + ["closed"], out
