"""One hostile-kernel suite, run under each sandbox preset (``Sandbox.default()`` and
``Sandbox.strict()``), with real worker processes.

Every attack comes from ``tests/hostile.py`` (or ``tests/kernels.py``) and is bounded in
the kernel code itself. For each one, the test checks that:

(a) the caller gets a clear typed corral error, or the attack fails inside the kernel and
    comes back as ``KernelError`` with the remote type, within a deadline;
(b) the supervisor and another tenant (the bystander, started before the attack) carry
    on: the bystander's same worker answers afterwards;
(c) no process of the attacker's tree is left once its worker is evicted (or gone): its
    worker, what the kernel says it started, what the host saw under it, and anything
    else left under the warden that belongs to no live worker.

Under ``strict()`` the pids a kernel sees are those of its own PID namespace; the host
side maps them through ``NSpid`` (see :meth:`Arena.watch`).

Where ``strict()`` cannot start (not root; an interpreter other uids cannot read), its
half of the suite is skipped with the reason ``start()`` gave (``CORRAL_REQUIRE_STRICT=1``,
set by CI as root, turns that into a failure). The assertions that only hold under
``strict()`` are marked ``# STRICT:`` (dedicated non-root uid, pid 2 under corral's init
in a PID namespace, a private /proc, a private size-limited /dev/shm, no network, a pids
cgroup).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psutil
import pytest

import corral
from corral import Sandbox, Supervisor
from corral.supervisor._config import DEFAULT_ENV_ALLOWLIST
from tests.helpers import pid_gone, start_strict, wait_pid_gone
from tests.hostile import BOMB_CAP

HOSTILE = "tests.hostile:make"
HANGS = "tests.hostile:hang_on_import"
ATTACKER = "attacker"
BYSTANDER = "bystander"
STEP = 30.0  # seconds any one step may take (the deadline), a safety net: never waited out
GRACE = 30.0  # seconds an attacker's process may take to vanish once its worker is gone
SHORT = 1.0  # the call timeout of a call whose timeout is the subject of the test
FAST: dict[str, Any] = {
    # Generous: these bound ordinary starts and calls, which a busy host may slow down;
    # only the calls that are about timeouts get SHORT, each on its own.
    "call_timeout": 30.0,
    "start_timeout": 20.0,
    "shutdown_timeout": 1.0,
    "term_timeout": 0.5,
    "kill_timeout": 2.0,
    "drain_timeout": 1.0,
    "restart_intensity": 50,  # attacks crash workers on purpose; no backoff in these tests
}
PRESETS: dict[str, Callable[[], Sandbox]] = {
    "default": Sandbox.default,
    "strict": Sandbox.strict,
    "none": Sandbox.none,  # the control: shows an attack works where nothing stops it
}
ROOT = os.geteuid() == 0
SMALL_PIDS = 32  # max_processes for the bomb tests (used by strict()'s pids cgroup)
MIB = 1 << 20

pytestmark = pytest.mark.timeout(120)

E = TypeVar("E", bound=BaseException)


@pytest.fixture(params=["default", "strict"])
def preset(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private temporary directory of the test's own, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="corral-hostile-") as path:
        yield Path(path)


# -- the supervisor and the arena ----------------------------------------------------------------


async def start_supervisor(
    preset: str, factory: str = HOSTILE, *, sandbox: dict[str, Any] | None = None, **options: Any
) -> Supervisor:
    """Build a supervisor on ``preset`` (adjusted by ``sandbox``) and start it.

    A ``strict()`` supervisor that this host (or this corral) cannot start skips the
    test with the reason ``start()`` gave, or fails it when ``CORRAL_REQUIRE_STRICT=1``.
    """
    chosen = PRESETS[preset]()
    if sandbox:
        chosen = msgspec.structs.replace(chosen, **sandbox)
    sup = Supervisor(factory, sandbox=chosen, **{**FAST, **options})
    if preset == "strict":
        return await start_strict(sup)  # skips (or fails) with the layers it lacks
    await sup.start()
    return sup


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants now, as the host sees them ([] if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ns_pid(proc: psutil.Process) -> int | None:
    """The pid ``proc`` has in its own (innermost) PID namespace: the last NSpid field."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return None


def alive(proc: psutil.Process) -> bool:
    """True if ``proc`` (this very process: psutil checks its start time) still runs code."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def survivors(procs: Iterable[psutil.Process], timeout: float = GRACE) -> list[str]:
    """Wait (on pidfds) until every process in ``procs`` is gone; describe those that are not."""
    live = {p.pid: p for p in procs if alive(p)}
    await asyncio.gather(
        *(wait_pid_gone(pid, timeout) for pid in live), return_exceptions=True
    )  # a TimeoutError is reported below, with what is still there
    left = []
    for proc in live.values():
        if alive(proc):
            with contextlib.suppress(psutil.Error):
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
    return left


class Arena:
    """A started supervisor with a bystander tenant, and what the test saw of the
    attacker's processes (host side), so it can check they are all gone."""

    def __init__(self, sup: Supervisor, preset: str) -> None:
        self.sup = sup
        self.preset = preset
        self.strict = preset == "strict"
        # As root, default() also gets a pids cgroup and a uid of its own per worker.
        self.bounded = self.strict or ROOT
        self.bystander = 0  # host pid of the bystander's worker (corral's init under strict)
        self.warden: psutil.Process | None = None
        self.suspects: dict[int, psutil.Process] = {}

    def pid(self, tenant: str = ATTACKER) -> int | None:
        """The tenant's worker pid as the host sees it (from ``stats()``), None if none."""
        for worker in self.sup.stats().workers:
            if worker.tenant == tenant:
                return worker.pid
        return None

    async def attacker(self, tenant: str = ATTACKER) -> int:
        """Start ``tenant``'s worker (before the attack) and remember its host pid."""
        async with asyncio.timeout(STEP):
            pid = (await self.sup.get_or_create(tenant)).pid
        assert pid is not None
        self.watch(tenant)
        return pid

    def watch(self, tenant: str = ATTACKER, reported: Iterable[int] = ()) -> None:
        """Remember ``tenant``'s processes now: its worker's tree as the host sees it, and
        the pids its kernel ``reported`` (as the kernel sees them: under strict, pids of
        its own namespace, found in that tree through NSpid)."""
        pid = self.pid(tenant)
        procs = tree(pid) if pid is not None else []
        by_ns_pid = {ns_pid(p): p for p in procs}
        for reported_pid in reported:
            if reported_pid in by_ns_pid:
                procs.append(by_ns_pid[reported_pid])
            elif not self.strict:  # a host pid; a setsid'd daemon is under the warden
                procs.extend(tree(reported_pid))
            else:  # STRICT: everything it starts stays under its own init
                raise AssertionError(f"pid {reported_pid} is not in {tenant}'s namespace")
        for proc in procs:
            self.suspects.setdefault(proc.pid, proc)

    async def kernel_host_pid(self, tenant: str) -> int:
        """The host pid of the process running ``tenant``'s kernel (under strict, pid 2 of
        its namespace, the child of corral's init)."""
        seen = (await self.sup.call(tenant, "whoami"))["pid"]
        pid = self.pid(tenant)
        assert pid is not None
        for proc in tree(pid):
            if ns_pid(proc) == seen:
                return proc.pid
        raise AssertionError(f"{tenant}'s kernel (pid {seen} inside) not found under {pid}")

    async def fails(
        self,
        error: type[E],
        method: str,
        *args: Any,
        tenant: str = ATTACKER,
        timeout: float | None = None,
    ) -> E:
        """The call raises ``error`` (within the deadline); return it. ``timeout``: this
        call's own call timeout (default: the supervisor's)."""
        with pytest.raises(error) as info:
            async with asyncio.timeout(STEP):
                if timeout is None:
                    await self.sup.call(tenant, method, *args)
                else:
                    await self.sup.invoke(tenant, method, args, timeout=timeout)
        return info.value

    async def refused(self, method: str, *args: Any, tenant: str = ATTACKER) -> corral.KernelError:
        """The attack failed inside the kernel: the call raises ``KernelError``."""
        return await self.fails(corral.KernelError, method, *args, tenant=tenant)

    async def ok(self, method: str, *args: Any, tenant: str = ATTACKER) -> Any:
        async with asyncio.timeout(STEP):
            return await self.sup.call(tenant, method, *args)

    async def bystander_carries_on(self) -> None:
        """The other tenant's same worker answers."""
        async with asyncio.timeout(STEP):
            assert await self.sup.call(BYSTANDER, "echo", "still here") == "still here"
        assert self.pid(BYSTANDER) == self.bystander, "the bystander's worker was replaced"

    async def attacker_gone(self, tenant: str = ATTACKER) -> None:
        """Evict the attacker (if it still has a worker); then nothing it started may be
        left, and nothing may be left under the warden that belongs to no live worker."""
        async with asyncio.timeout(STEP):
            await self.sup.evict(tenant)
        assert tenant not in self.sup
        left = await survivors(self.suspects.values())
        assert not left, f"the attacker's processes outlived its worker: {left}"
        assert self.warden is not None
        owned = {p.pid for w in self.sup.stats().workers if w.pid for p in tree(w.pid)}
        try:
            strays = [p for p in self.warden.children(recursive=True) if p.pid not in owned]
        except psutil.NoSuchProcess:
            raise AssertionError("the warden is gone") from None
        left = await survivors(strays)
        assert not left, f"processes of no live worker under the warden: {left}"

    def kill_suspects(self) -> None:
        """Leave nothing behind, even when a check failed (SIGKILL, by process identity)."""
        for proc in self.suspects.values():
            if alive(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


@contextlib.asynccontextmanager
async def arena(
    preset: str, factory: str = HOSTILE, *, sandbox: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[Arena]:
    """A started supervisor (see :func:`start_supervisor`) whose bystander is up."""
    sup = await start_supervisor(preset, factory, sandbox=sandbox, **options)
    here = Arena(sup, preset)
    try:
        async with asyncio.timeout(STEP):
            pid = (await sup.get_or_create(BYSTANDER)).pid
            assert pid is not None
            assert await sup.call(BYSTANDER, "echo", "ready") == "ready"
        here.bystander = pid
        here.warden = psutil.Process(pid).parent()
        yield here
    finally:
        try:
            async with asyncio.timeout(STEP):
                await sup.aclose()
        finally:
            here.kill_suspects()


def assert_errno(err: corral.KernelError, remote_type: str, code: int) -> None:
    assert err.remote_type == f"builtins.{remote_type}", err
    assert err.remote_message.startswith(f"[Errno {code}]"), err


# -- runaway calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spin", "sleep_forever", "stop_self"])
async def test_a_runaway_call_is_killed_at_its_timeout(preset: str, method: str) -> None:
    """CPU spin, a sleep that never ends, SIGSTOP on itself."""
    async with arena(preset) as a:
        pid = await a.attacker()
        err = await a.fails(corral.CallTimeoutError, method, timeout=SHORT)
        assert (err.tenant, err.pid) == (ATTACKER, pid)
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert pid_gone(pid)
        assert a.sup.stats().stops.get("timeout") == 1  # counted once it was reaped


async def test_a_factory_that_hangs_fails_the_start_in_time(preset: str) -> None:
    """An import-time hang: the factory never returns."""
    # start_timeout also bounds the bystander's start: long enough for a busy host.
    async with arena(preset, HANGS, start_timeout=5.0) as a:
        err = await a.fails(corral.StartError, "echo", 1, tenant="hang")
        assert "did not become ready within 5.0s" in str(err), err
        assert err.pid is not None and pid_gone(err.pid)
        await a.bystander_carries_on()
        await a.attacker_gone("hang")
        assert a.sup.stats().stops.get("start_timeout") == 1


async def test_a_memory_bomb_stops_at_the_hard_limit(preset: str) -> None:
    limit = 256 * MIB
    async with arena(preset, worker_memory_hard_limit=limit) as a:
        pid = await a.attacker()
        err = await a.fails(corral.MemoryLimitError, "bomb", 8, 1024)  # stops at 1 GiB anyway
        assert (err.limit, err.pid) == (limit, pid)
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert a.sup.stats().stops.get("memory_hard_limit") == 1


# -- bombs ---------------------------------------------------------------------------------------


async def test_a_fork_bomb_is_bounded_and_dies_with_its_worker(preset: str) -> None:
    async with arena(preset, sandbox={"max_processes": SMALL_PIDS}) as a:
        await a.attacker()
        outcome = await a.ok("fork_bomb", BOMB_CAP)
        forked = outcome["pids"]
        a.watch(reported=forked)
        if a.bounded:  # the pids cgroup (and RLIMIT_NPROC) stop it early
            assert outcome["error"] == "EAGAIN", outcome
            assert 0 < len(forked) < SMALL_PIDS
        else:  # without root nothing bounds processes: the kernel's own cap stopped it
            assert (outcome["error"], len(forked)) == (None, BOMB_CAP)
        await a.bystander_carries_on()
        await a.attacker_gone()


async def test_a_fork_bomb_does_not_stall_other_tenants_starts(preset: str) -> None:
    """Once the bomb's worker is evicted, a new tenant's worker starts as fast as ever."""
    # Regression: Warden._reap once swept for orphans (a psutil scan of every child, and a
    # create-time check per SIGKILL) once per orphan it reaped: O(N^2) for N orphans, and
    # the single-threaded warden spawned nothing meanwhile (start_timeout does not cover
    # the wait): 150 bomb processes held every new start ~2 s, 600 about 30 s.
    async with arena(preset, sandbox={"max_processes": SMALL_PIDS}) as a:
        await a.attacker()
        outcome = await a.ok("fork_bomb", BOMB_CAP)
        a.watch(reported=outcome["pids"])
        await a.attacker_gone()
        # A hang guard, not a measurement (a start takes ~20 ms; with the O(N^2) sweep a
        # bomb of 600 held it about 30 s).
        async with asyncio.timeout(15.0):
            await a.sup.get_or_create("newcomer")
        await a.bystander_carries_on()


async def test_a_thread_bomb_is_bounded_and_the_worker_goes_on(preset: str) -> None:
    async with arena(preset, sandbox={"max_processes": SMALL_PIDS}) as a:
        await a.attacker()
        outcome = await a.ok("thread_bomb", BOMB_CAP)
        if a.bounded:  # the pids cgroup counts threads too
            assert outcome["started"] < SMALL_PIDS, outcome
            assert "can't start new thread" in outcome["error"], outcome
        else:
            assert outcome == {"started": BOMB_CAP, "error": None}
        assert await a.ok("echo", "after the bomb") == "after the bomb"
        await a.bystander_carries_on()
        await a.attacker_gone()  # its threads still wait: the stop must not


async def test_a_double_forked_setsid_daemon_dies_with_its_worker(preset: str) -> None:
    async with arena(preset) as a:
        await a.attacker()
        daemon = await a.ok("start_child", True)  # double fork, own session
        a.watch(reported=[daemon])
        await a.bystander_carries_on()
        await a.attacker_gone()


# -- signals ---------------------------------------------------------------------------------


async def test_signalling_the_supervisor_the_warden_and_a_sibling(preset: str) -> None:
    """Signal 0, or a signal the target handles: an attack that lands shows (the host's
    SIGUSR2 handler runs, the sibling's held call returns) without killing anything."""
    loop = asyncio.get_running_loop()
    host_hit = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, host_hit.set)
    try:
        async with arena(preset) as a:
            sibling = asyncio.ensure_future(
                a.sup.call(BYSTANDER, "hold_until_signal", "gate", signal.SIGUSR1)
            )
            try:
                assert await a.ok("wait_entered", "gate", tenant=BYSTANDER)
                sibling_kernel = await a.kernel_host_pid(BYSTANDER)
                assert a.warden is not None
                await a.attacker()
                targets = [
                    (os.getpid(), signal.SIGUSR2),
                    (os.getpid(), 0),
                    (a.warden.pid, 0),
                    (sibling_kernel, signal.SIGUSR1),
                    (a.bystander, signal.SIGUSR1),
                    (sibling_kernel, 0),
                ]
                for target, signum in targets:
                    err = await a.refused("send_signal", target, signum)
                    if a.strict:  # STRICT: host pids do not exist in its PID namespace
                        assert_errno(err, "ProcessLookupError", errno.ESRCH)
                    else:  # Landlock's signal scope
                        assert_errno(err, "PermissionError", errno.EPERM)
                assert not host_hit.is_set()
                assert not sibling.done()  # still waiting for its SIGUSR1
                os.kill(sibling_kernel, signal.SIGUSR1)  # the test itself may
                async with asyncio.timeout(STEP):
                    assert await sibling == "released gate"
            finally:
                if not sibling.done():
                    sibling.cancel()
                    with contextlib.suppress(BaseException):
                        await sibling
            await a.bystander_carries_on()
            await a.attacker_gone()
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)


# -- secrets -----------------------------------------------------------------------------------


def host_secrets(canary: str) -> set[str]:
    """``NAME=value`` items a worker must not see: the canary, and every variable the host
    process was started with that is not on the allowlist. /proc/<pid>/environ shows the
    environment a process was exec'd with, so a canary set now is not in it: the host's
    own start-up variables (HOME, ...) are the secrets that file could leak."""
    with open("/proc/self/environ", "rb") as f:
        items = [i.decode(errors="replace") for i in f.read().split(b"\0") if b"=" in i]
    return {
        f"CORRAL_HOSTILE_SECRET={canary}",
        *(item for item in items if item.partition("=")[0] not in DEFAULT_ENV_ALLOWLIST),
    }


@pytest.mark.parametrize("source", ["own", "parent", "host"])
async def test_environment_secrets_stay_out_of_reach(
    preset: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's own environment, its parent's (the warden, or corral's init under
    strict) and the host process's (/proc/<pid>/environ) must show none of the host's
    secrets."""
    canary = uuid.uuid4().hex
    monkeypatch.setenv("CORRAL_HOSTILE_SECRET", canary)  # before the supervisor exists
    secrets = host_secrets(canary)
    async with arena(preset) as a:
        await a.attacker()
        who = await a.ok("whoami")
        seen: set[str] = set()
        if source == "own":
            for env in (await a.ok("environ"), await a.ok("env")):
                seen.update(f"{name}={value}" for name, value in env.items())
        else:
            pid = who["ppid"] if source == "parent" else os.getpid()
            try:
                seen.update((await a.ok("read_environ", pid)).split("\0"))
            except corral.KernelError as err:  # refused: nothing seen
                if a.strict and source == "host":  # STRICT: no such pid in its namespace
                    assert err.remote_type == "builtins.FileNotFoundError", err
                else:
                    assert err.remote_type == "builtins.PermissionError", err
        leaked = sorted(item.partition("=")[0] for item in seen & secrets)  # names only
        assert not leaked, f"the worker read the host's {leaked}"
        assert not any(canary in item for item in seen)
        if a.strict:  # STRICT: corral's init is its parent
            assert who["ppid"] == 1
        await a.bystander_carries_on()
        await a.attacker_gone()


# -- network -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_no_connection_reaches_a_loopback_listener(
    preset: str, kind: str, scratch: Path
) -> None:
    if kind == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        address: Any = listener.getsockname()[1]
        method = "connect_tcp"
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = str(scratch / "s.sock")
        listener.bind(address)
        listener.listen(4)
        method = "connect_unix"
    with listener:
        listener.setblocking(False)
        async with arena(preset) as a:
            await a.attacker()
            err = await a.refused(method, address)
            if a.strict:  # STRICT: no network at all (seccomp, an empty net namespace)
                assert err.remote_message.startswith("[Errno "), err  # an OSError of some kind
            else:
                assert_errno(err, "PermissionError", errno.EACCES)  # seccomp: no socket()
            await a.bystander_carries_on()
            await a.attacker_gone()
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


# -- files and fds -----------------------------------------------------------------------------


async def test_a_huge_file_stops_at_the_size_limit(preset: str) -> None:
    limits = {"core": 0, "nofile": 1024, "fsize": MIB}
    async with arena(preset, sandbox={"rlimits": limits}) as a:
        pid = await a.attacker()
        err = await a.refused("write_file", "huge.bin", 4 * MIB)  # in its scratch dir
        assert_errno(err, "OSError", errno.EFBIG)
        assert await a.ok("write_file", "small.bin", 1000) == 1000
        assert a.pid() == pid  # a refusal, not a crash
        await a.bystander_carries_on()
        await a.attacker_gone()


async def test_fd_exhaustion_stays_inside_the_worker(preset: str) -> None:
    async with arena(preset) as a:
        pid = await a.attacker()
        outcome = await a.ok("hoard_fds", 4096)  # keeps every fd it got
        assert outcome["error"] == "EMFILE" and outcome["open"] < 1024, outcome
        assert await a.ok("echo", "no fd left") == "no fd left"  # and it still serves
        assert a.pid() == pid
        await a.bystander_carries_on()
        await a.attacker_gone()


async def test_dev_shm_leaks_nothing_to_the_host(preset: str) -> None:
    prefix = f"corral-hostile-{uuid.uuid4().hex[:12]}"
    try:
        async with arena(preset) as a:
            await a.attacker()
            if a.strict:  # STRICT: a private writable tmpfs, bounded, gone with the worker
                listed = await a.ok("shm_write", prefix, 4, MIB)
                assert [n for n in listed if n.startswith(prefix)] == [
                    f"{prefix}-{i}" for i in range(4)
                ]
                fill = await a.ok("fill_shm", f"{prefix}-fill", 512 * MIB)
                assert fill["errno"] == errno.ENOSPC and fill["written"] < 512 * MIB, fill
                assert await a.ok("echo", "full") == "full"
                await a.attacker_gone()
                fresh = await a.ok("shm_list")  # the tenant's next worker
                assert not [n for n in fresh if n.startswith(prefix)], fresh
            else:  # Landlock: /dev/shm is outside the scratch dir
                err = await a.refused("shm_write", prefix, 4, MIB)
                assert_errno(err, "PermissionError", errno.EACCES)
                fill = await a.ok("fill_shm", f"{prefix}-fill", 512 * MIB)
                assert fill == {"written": 0, "errno": errno.EACCES}, fill
            await a.bystander_carries_on()
            await a.attacker_gone()
    finally:
        leaked = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
        for name in leaked:
            os.unlink(os.path.join("/dev/shm", name))  # do not litter the host
    assert not leaked, f"the attacker's files reached the host's /dev/shm: {leaked}"


# -- the IPC pipe ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["result", "raw-frame"])
async def test_a_response_over_max_frame_bytes(preset: str, how: str) -> None:
    """Through the worker loop, an oversize result is refused before it is sent (the
    worker stays); written straight to the pipe, it is a protocol violation (replaced)."""
    async with arena(preset, max_frame_bytes=64 * 1024) as a:
        pid = await a.attacker()
        if how == "result":
            err: corral.CorralError = await a.fails(corral.InvalidCallError, "big", MIB)
            assert "exceeds the limit of 65536 bytes" in str(err), err
            assert a.pid() == pid
        else:
            err = await a.fails(corral.ProtocolError, "send_big_frame", MIB)
            assert "outside 1..65536 bytes" in str(err), err
            assert await a.ok("echo", 1) == 1
            assert a.pid() != pid  # a fresh worker serves
        await a.bystander_carries_on()
        await a.attacker_gone()


@pytest.mark.parametrize("payload", ["garbage", "length-bomb", "pickle-frame", "pickle-raw"])
async def test_junk_on_the_ipc_pipe_kills_only_its_worker(
    preset: str, payload: str, scratch: Path
) -> None:
    """fd 4 is the worker's reply pipe. Nothing on it is ever unpickled: a pickle that
    would create a file if it were leaves no file."""
    canary = scratch / "unpickled"
    calls: dict[str, tuple[str, tuple[Any, ...]]] = {
        "garbage": ("garbage", ()),
        "length-bomb": ("oversize", (2**32 - 1,)),
        "pickle-frame": ("send_pickle", (str(canary), True)),
        "pickle-raw": ("send_pickle", (str(canary), False)),
    }
    method, args = calls[payload]
    async with arena(preset) as a:
        pid = await a.attacker()
        await a.fails(corral.ProtocolError, method, *args)
        assert await a.ok("echo", 1) == 1
        assert a.pid() != pid
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert a.sup.stats().stops.get("protocol_error") == 1
    assert not canary.exists(), "something unpickled what the worker sent"


async def test_a_worker_that_closes_its_reply_pipe_is_killed(preset: str) -> None:
    async with arena(preset) as a:
        pid = await a.attacker()
        err = await a.fails(corral.WorkerCrashedError, "close_pipe")
        assert "closed its pipe" in str(err), err
        assert pid_gone(pid)
        await a.bystander_carries_on()
        await a.attacker_gone()


@pytest.mark.parametrize("how", ["caller-cancelled", "call-timeout"])
async def test_a_late_result_never_reaches_the_next_call(preset: str, how: str) -> None:
    async with arena(preset) as a:
        pid = await a.attacker()
        if how == "caller-cancelled":
            late = asyncio.ensure_future(a.sup.invoke(ATTACKER, "hold", ("gate",), timeout=None))
            assert await a.ok("wait_entered", "gate")
            late.cancel()  # the caller walks away; the worker still owes the result
            with pytest.raises(asyncio.CancelledError):
                await late
            assert await a.ok("release", "gate") is True  # the abandoned call completes now
        else:
            await a.fails(corral.CallTimeoutError, "hold", "gate", timeout=SHORT)
        for i in range(3):
            assert await a.ok("echo", i) == i  # never "released gate"
        if how == "caller-cancelled":
            assert a.pid() == pid  # a result nobody waits for is no violation
            (info,) = [w for w in a.sup.stats().workers if w.tenant == ATTACKER]
            assert info.requests == 6  # hold (its late result came and was dropped) + 5 calls
            assert a.sup.stats().stops == {}
        else:
            assert a.pid() != pid
        await a.bystander_carries_on()
        await a.attacker_gone()


# -- termination -------------------------------------------------------------------------------


async def test_a_worker_that_ignores_sigterm_is_killed(preset: str) -> None:
    events: list[corral.WorkerEvent] = []
    async with arena(preset, shutdown_timeout=0.5, term_timeout=0.5, on_event=events.append) as a:
        pid = await a.attacker()
        assert await a.ok("become_stubborn") is True  # SIGTERM ignored, shutdown() hangs
        await a.bystander_carries_on()
        await a.attacker_gone()
        (stopped,) = [e for e in events if e.kind == "stopped" and e.tenant == ATTACKER]
        assert (stopped.pid, stopped.reason, stopped.rung) == (pid, "evicted", "kill")
        assert stopped.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("method", "args", "exitcode", "signum"),
    [
        pytest.param("crash", (3,), 3, None, id="os._exit"),
        pytest.param("segfault", (), None, signal.SIGSEGV, id="segfault"),
    ],
)
async def test_a_worker_dying_mid_call_fails_its_calls(
    preset: str, method: str, args: tuple[Any, ...], exitcode: int | None, signum: int | None
) -> None:
    async with arena(preset) as a:
        pid = await a.attacker()
        other = asyncio.ensure_future(a.sup.invoke(ATTACKER, "hold", ("gate",), timeout=None))
        try:
            assert await a.ok("wait_entered", "gate")
            err = await a.fails(corral.WorkerCrashedError, method, *args)
            assert (err.exitcode, err.signal, err.pid) == (exitcode, signum, pid)
            with pytest.raises(corral.WorkerCrashedError):  # the other call in flight, too
                async with asyncio.timeout(STEP):
                    await other
        finally:
            if not other.done():
                other.cancel()
                with contextlib.suppress(BaseException):
                    await other
        assert await a.ok("echo", "again") == "again"  # the tenant gets a fresh worker
        assert a.pid() != pid
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert a.sup.stats().stops.get("crashed") == 1


# -- exceptions that fight back ----------------------------------------------------------------

_BOUNDED = 16 * 1024  # what a caller may get as a message, generously (8 KiB + framing)
_TRACEBACK = 64 * 1024 + 64


@pytest.mark.parametrize(
    ("method", "size", "max_frame_bytes"),
    [
        pytest.param("raise_unprintable", 0, None, id="str-raises"),
        pytest.param("raise_enormous", 10 * MIB, None, id="enormous-message"),
        pytest.param(
            "raise_enormous",
            10 * MIB,
            64 * 1024,
            id="enormous-message-small-frames",  # Regression: was a ProtocolError
        ),
        pytest.param(
            "raise_enormous_type",
            MIB,
            None,
            id="enormous-type-name",  # Regression: reached the caller whole
        ),
    ],
)
async def test_a_hostile_exception_comes_back_bounded(
    preset: str, method: str, size: int, max_frame_bytes: int | None
) -> None:
    options: dict[str, Any] = (
        {} if max_frame_bytes is None else {"max_frame_bytes": max_frame_bytes}
    )
    async with arena(preset, **options) as a:
        pid = await a.attacker()
        err = await a.refused(method, *((size,) if size else ()))
        if method == "raise_unprintable":
            assert err.remote_message == "<unprintable _Unprintable>", err
        assert len(err.remote_message) < _BOUNDED
        assert len(err.remote_traceback) <= _TRACEBACK
        assert len(err.remote_type) < _BOUNDED, f"remote_type is {len(err.remote_type)} long"
        assert len(str(err)) < _BOUNDED, f"str(KernelError) is {len(str(err))} long"
        assert a.pid() == pid  # the worker is still up
        await a.bystander_carries_on()
        await a.attacker_gone()


# -- privileges ------------------------------------------------------------------------------


needs_root = pytest.mark.skipif(not ROOT, reason="the attack is about a root host")


def path_gone(path: str) -> bool:
    return not os.path.lexists(path)


@needs_root
async def test_a_worker_holds_no_capability(preset: str) -> None:
    """As root, every capability set is empty (the bounding set too), and acts that need
    one are refused; under none() the worker has them all (the control)."""
    async with arena(preset) as a:
        await a.attacker()
        assert await a.ok("capabilities") == dict.fromkeys(
            ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0
        )
        acts = await a.ok("privileged_acts")
        assert acts == {"sethostname": "EPERM", "raise_rlimit": "EPERM"}, acts
        report = str(a.sup.stats().sandbox["capabilities"])
        assert report.startswith("on (all dropped: "), report
        await a.bystander_carries_on()
        await a.attacker_gone()
    async with arena("none") as control:
        caps = await control.ok("capabilities", tenant=BYSTANDER)
        assert caps["CapEff"] != 0 and caps["CapBnd"] != 0, caps


@needs_root
async def test_no_setuid_file_can_be_planted_and_the_scratch_goes(preset: str) -> None:
    """A root worker tries to leave a setuid copy of the interpreter (and an immutable
    file) in its scratch dir: every attempt is refused, the scratch dir is a nosuid tmpfs,
    and it is gone once the worker is."""
    async with arena(preset) as a:
        await a.attacker()
        out = await a.ok("plant_setuid")
        scratch = out.pop("scratch")
        for attempt in ("chmod_setuid", "chmod_setgid", "fchmod_setuid", "create_setuid"):
            assert out[attempt] == "EPERM", out
        assert out["immutable"] != "ok", out
        assert out["mode_bits"] & 0o6000 == 0 and (out["made_bits"] or 0) & 0o6000 == 0, out
        assert os.statvfs(scratch).f_flag & os.ST_NOSUID, "the scratch dir is not nosuid"
        assert os.statvfs(scratch).f_flag & os.ST_NODEV, "the scratch dir is not nodev"
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert path_gone(scratch), "the scratch dir outlived its worker"


@needs_root
async def test_a_full_scratch_dir_says_enospc_and_the_worker_goes_on(preset: str) -> None:
    size, inodes = 8 * MIB, 256
    async with arena(preset, sandbox={"scratch_bytes": size, "scratch_inodes": inodes}) as a:
        await a.attacker()
        out = await a.ok("fill_scratch", 8 * size, 8 * inodes)
        assert out["error"] == "ENOSPC" and out["bytes"] <= size, out
        assert out["files_error"] == "ENOSPC" and out["files"] < inodes, out
        assert await a.ok("echo", "still serving") == "still serving"
        scratch = await a.ok("litter", 0)
        await a.bystander_carries_on()
        await a.attacker_gone()
        assert path_gone(scratch)
        # What it left goes with one unmount: a new tenant starts at once.
        async with asyncio.timeout(STEP):
            await a.sup.get_or_create("newcomer")


@pytest.mark.parametrize("quota", [True, False], ids=["tmpfs", "plain-dir"])
async def test_thousands_of_files_left_in_scratch_do_not_outlive_the_worker(
    preset: str, quota: bool
) -> None:
    """A tmpfs goes with one unmount; a plain directory (no root, or no quota asked for)
    is removed by a child of the warden, which meanwhile goes on starting workers."""
    async with arena(preset, sandbox=None if quota else {"scratch_bytes": None}) as a:
        await a.attacker()
        scratch = await a.ok("litter", 2000)
        await a.attacker_gone()
        assert path_gone(scratch)
        await a.bystander_carries_on()


# -- other processes --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def target_process() -> AsyncIterator[int]:
    """A process of the test's own (same uid as the host) for a kernel to act on: it only
    waits for its stdin to close."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
    )
    try:
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        async with asyncio.timeout(STEP):
            await proc.wait()


ACTS = ("prlimit", "setpriority", "sched_setaffinity", "sched_setscheduler", "ioprio_set")


@pytest.mark.parametrize("own_uid", [True, False], ids=["own-uid", "host-uid"])
async def test_a_worker_cannot_act_on_other_processes(preset: str, own_uid: bool) -> None:
    """Resource limits, scheduling, I/O priority, signals, process_madvise, pidfds and
    /proc/<pid>/{environ,maps,cmdline} of the host process, a sibling worker and a process
    of the host's uid are refused, also for a worker that keeps the host's uid (then only
    seccomp and Landlock stand in the way); on itself the same calls work."""
    if preset == "strict" and not own_uid:
        pytest.skip("strict() always runs a worker under a uid of its own")
    async with (
        target_process() as other,
        arena(preset, sandbox=None if own_uid else {"dedicated_uid": False}) as a,
    ):
        await a.attacker()
        for victim in (os.getpid(), a.bystander, other):
            acts = await a.ok("act_on", victim)
            landed = sorted(act for act, outcome in acts.items() if outcome == "ok")
            assert not landed, f"acts on pid {victim} landed: {landed} ({acts})"
        me = (await a.ok("whoami"))["pid"]
        own = await a.ok("act_on", me)
        assert all(own[act] == "ok" for act in (*ACTS, "kill", "environ", "maps")), own
        assert own["process_madvise"] == "EPERM" and own["pidfd_open"] == "ENOSYS", own
        await a.bystander_carries_on()
        await a.attacker_gone()


async def test_acting_on_other_processes_works_without_a_sandbox() -> None:
    """The control for the test above: under none() the same acts land."""
    async with target_process() as other, arena("none") as a:
        acts = await a.ok("act_on", other, tenant=BYSTANDER)
        for act in (*ACTS, "kill", "environ", "maps", "cmdline", "pidfd_open"):
            assert acts[act] == "ok", acts


# -- sockets ---------------------------------------------------------------------------------


async def test_no_socket_family_is_allowed_but_unix_pairs(preset: str) -> None:
    async with arena(preset) as a:
        await a.attacker()
        out = await a.ok("socket_families")
        assert out.pop("socketpair") == "ok"  # the one thing a worker's own asyncio needs
        assert set(out.values()) == {"EACCES"}, out
        await a.bystander_carries_on()
        await a.attacker_gone()
    async with arena("none") as control:
        out = await control.ok("socket_families", tenant=BYSTANDER)
        assert out["AF_UNIX"] == out["AF_INET"] == "ok", out


# -- who the worker is -------------------------------------------------------------------------


async def test_what_the_worker_runs_as_and_sees(preset: str) -> None:
    async with arena(preset) as a:
        pid = await a.attacker()
        me = await a.ok("identity")
        if a.strict:  # STRICT: its own uid, pid 2 under corral's init, its own /proc, no net
            assert 0 not in (me["uid"], me["gid"]), me
            assert (me["pid"], me["ppid"]) == (2, 1), me
            assert me["groups"] == [] and me["visible"] == [1, 2], me
            assert me["interfaces"] == ["lo"], me
            other = await a.ok("identity", tenant=BYSTANDER)
            assert other["uid"] != me["uid"]  # a uid per worker
            # stats() names the kernel's own process on the host: pid 2, child of the init
            (info,) = [w for w in a.sup.stats().workers if w.tenant == ATTACKER]
            assert info.kernel_pid is not None and info.kernel_pid != pid, info
            kernel = psutil.Process(info.kernel_pid)
            assert (kernel.ppid(), ns_pid(kernel)) == (pid, 2), info
        elif ROOT:  # default() as root: a uid of its own, but the host's pid namespace
            assert 0 not in (me["uid"], me["gid"]) and me["groups"] == [], me
            assert me["pid"] == pid and os.getpid() in me["visible"], me
            other = await a.ok("identity", tenant=BYSTANDER)
            assert other["uid"] != me["uid"]  # a uid per worker
        else:  # default() without root keeps the host's uid
            assert (me["uid"], me["pid"]) == (os.getuid(), pid), me
            assert os.getpid() in me["visible"]
        if not a.strict:  # no namespace: the kernel runs in the worker process itself
            assert [w.kernel_pid for w in a.sup.stats().workers if w.tenant == ATTACKER] == [pid]
        await a.bystander_carries_on()
        await a.attacker_gone()
