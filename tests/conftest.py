"""Shared fixtures. Every test is checked for leftovers: child processes and threads
that it started must be gone when it ends (waited for with a deadline, then failed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
import pytest_asyncio
from blockbuster import blockbuster_ctx

from tests.fakes import FakeLauncher
from tests.helpers import open_fds

_LEAK_DEADLINE = 10.0


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    me = psutil.Process()
    before_procs = {p.pid for p in me.children(recursive=True)}
    before_threads = set(threading.enumerate())
    yield
    extra = [p for p in me.children(recursive=True) if p.pid not in before_procs]
    _gone, alive = psutil.wait_procs(extra, timeout=_LEAK_DEADLINE)
    left = []
    for proc in alive:
        try:
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    threads = [t for t in threading.enumerate() if t not in before_threads]
    for thread in threads:
        thread.join(_LEAK_DEADLINE)
    running = [t.name for t in threads if t.is_alive()]
    assert not left, f"test left processes behind: {left}"
    assert not running, f"test left threads behind: {running}"


@pytest_asyncio.fixture(autouse=True)
async def no_pending_tasks() -> AsyncIterator[None]:
    """A test (and the supervisors it closed) must leave no task running on its loop, and
    corral's code must make no blocking call on the event loop while it runs."""
    with blockbuster_ctx(["corral"]) as bb:
        # The warden's one fork/exec per supervisor reads the exec status pipe (deliberate).
        bb.functions["os.read"].can_block_in("corral/supervisor/_process.py", "_launch")
        # A dead warden's cgroup leaves are emptied with a few cgroupfs writes (deliberate).
        for name in ("os.write", "io.BufferedReader.read"):
            bb.functions[name].can_block_in("corral/supervisor/_process.py", "_kill_cgroup_members")
        # A callable factory imports dill once, in the (sync) constructor.
        for function in bb.functions.values():
            function.can_block_in("corral/supervisor/_config.py", "serialise_factory")
        yield
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not pending, f"test left tasks running: {pending}"


@pytest_asyncio.fixture
async def fake_launcher() -> AsyncIterator[FakeLauncher]:
    """A :class:`tests.fakes.FakeLauncher` for ``Supervisor(launcher=...)``. The test must
    close it (closing the supervisor does); every fd opened meanwhile must be closed again."""
    fds = open_fds()
    launcher = FakeLauncher()
    yield launcher
    closed = launcher.closed
    if not closed:
        await launcher.aclose()
    left = open_fds() - fds
    assert closed, "the fake launcher was not closed (is a supervisor still running?)"
    assert not left, f"test left fds open: {sorted(left)}"
