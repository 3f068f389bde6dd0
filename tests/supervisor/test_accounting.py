"""What a worker starts is counted against it wherever it goes, and dies with it; a
worker's processes and threads are bounded (the pids cgroup).

Hostile kernels (``tests/cgroup_kernels.py``): children that double-fork, ``setsid`` and
hold 100+ MiB each outside the worker's process tree; a fork bomb and a thread bomb.
They run under ``Sandbox.default()`` and ``Sandbox.strict()`` as root, where the warden
gives each worker a memory cgroup (and a pids cgroup); without memory cgroups the tests
skip with the warden's reason.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import psutil
import pytest

from corral import Sandbox, Supervisor, WorkerEvent
from corral.supervisor._memory import MemorySample, ProcTreeProbe, cgroup_working_set
from corral.supervisor._process import WardenLauncher
from tests.helpers import start_strict

K = "tests.cgroup_kernels:make"
MiB = 1 << 20
FAST: dict[str, Any] = {
    "shutdown_timeout": 5.0,
    "term_timeout": 5.0,
    "start_timeout": 30.0,
    "call_timeout": 60.0,
}

pytestmark = pytest.mark.timeout(120)

SANDBOXES: dict[str, Callable[[], Sandbox]] = {
    "default": Sandbox.default,
    "strict": Sandbox.strict,
}


async def started(sup: Supervisor, sandbox: str) -> Supervisor:
    """Start ``sup`` and its worker "t"; skip where the sandbox or memory cgroups are
    unavailable here (the warden's reason)."""
    if sandbox == "strict":
        await start_strict(sup)
    else:
        await sup.start()
    await sup.call("t", "whoami")
    launcher = sup._launcher
    assert isinstance(launcher, WardenLauncher)
    if not launcher.memory_leaves():
        warden = launcher._warden
        why = warden.memory_cgroups_detail if warden is not None else "no warden"
        await sup.aclose()
        pytest.skip(f"no memory cgroups here: {why}")
    return sup


def escapees(token: str) -> list[psutil.Process]:
    """Processes on the host whose command line carries ``token``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if token in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def assert_all_gone(procs: list[psutil.Process]) -> None:
    """Each is gone or a zombie about to be reaped by the warden (killed: not running)."""
    _gone, alive = psutil.wait_procs(procs, timeout=30)
    running = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    assert not running, f"escaped processes outlived their worker: {running}"


class Stops:
    """``on_event``: the stopped events, awaitable."""

    def __init__(self) -> None:
        self.events: list[WorkerEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: WorkerEvent) -> None:
        if event.kind == "stopped":
            self.events.append(event)
            self.changed.set()

    async def first(self, tenant: str) -> WorkerEvent:
        async with asyncio.timeout(60):
            while True:
                for event in self.events:
                    if event.tenant == tenant:
                        return event
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def token() -> str:
    return f"corral-escapee-{uuid.uuid4().hex}"


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["default", "strict"])
async def test_escaped_children_count_against_the_worker_and_die_with_it(
    sandbox: str, token: str
) -> None:
    """Three children leave the worker's tree and hold 120 MiB each: the worker's sample
    counts them (its own tree is a fraction of that), the soft limit replaces it, and
    none of them outlives it."""
    count, mib, limit = 3, 120, 250 * MiB
    stops = Stops()
    sup = Supervisor(
        K,
        sandbox=SANDBOXES[sandbox](),
        worker_memory_limit=limit,
        memory_check_interval=0.1,
        on_event=stops,
        **FAST,
    )
    try:
        await started(sup, sandbox)
        assert await sup.call("t", "escape", count, mib, token) == count
        procs = escapees(token)
        assert len(procs) == count
        stopped = await stops.first("t")
        assert stopped.reason == "memory_limit", stopped
        assert_all_gone(procs)
    finally:
        await sup.aclose()
    assert_all_gone(escapees(token))


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["default", "strict"])
async def test_stats_show_escaped_memory_and_eviction_kills_it(sandbox: str, token: str) -> None:
    count, mib = 2, 100
    sup = Supervisor(K, sandbox=SANDBOXES[sandbox](), memory_check_interval=0.05, **FAST)
    try:
        await started(sup, sandbox)
        assert await sup.call("t", "escape", count, mib, token) == count
        procs = escapees(token)
        assert len(procs) == count
        (info,) = sup.stats().workers
        assert info.pid is not None
        launcher = sup._launcher
        assert isinstance(launcher, WardenLauncher)
        (leaf,) = launcher.memory_leaves().values()
        # The worker's own tree holds little; its cgroup holds the escapees too.
        tree = (await asyncio.to_thread(ProcTreeProbe().sample, [info.pid])).trees[info.pid]
        charged = await asyncio.to_thread(cgroup_working_set, leaf)
        assert charged is not None and charged >= count * mib * MiB, (charged, tree)
        if sandbox == "default":  # (under strict the pid is the init, their new parent)
            assert tree < mib * MiB, tree  # reparented to the warden: out of the tree
        # The sampler reports the larger figure (waited for: its next round).
        async with asyncio.timeout(30):
            while (sup.stats().workers[0].rss or 0) < count * mib * MiB:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # ok-sleep: the sampler's next round, with a deadline
        await sup.evict("t")
        assert_all_gone(procs)
        # The warden removes the leaf once it has reaped the last of them (they were
        # reparented to it): state in another process, polled with a deadline.
        async with asyncio.timeout(10):
            while await asyncio.to_thread(os.path.exists, leaf):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # ok-sleep: the warden's sweep, with a deadline
    finally:
        await sup.aclose()


# -- the pids bound ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["default", "strict"])
async def test_fork_and_thread_bombs_hit_the_pids_bound_and_the_worker_serves_on(
    sandbox: str,
) -> None:
    box = msgspec.structs.replace(SANDBOXES[sandbox](), max_processes=64)
    sup = Supervisor(K, sandbox=box, **FAST)
    try:
        if sandbox == "strict":
            await start_strict(sup)
        else:
            await sup.start()
        report = str(sup.stats().sandbox["cgroup_tree"])
        if not report.startswith("on"):
            pytest.skip(f"no pids cgroup here: {report}")
        pid = await sup.call("t", "whoami")
        forks = await sup.call("t", "fork_bomb", 300)
        assert 0 < forks["started"] < 64, forks
        assert forks["error"] == "BlockingIOError: errno 11", forks  # EAGAIN
        threads = await sup.call("t", "thread_bomb", 1000)
        assert 0 < threads["started"] < 64, threads
        assert threads["error"] == "RuntimeError: can't start new thread", threads
        assert await sup.call("t", "whoami") == pid  # the same worker serves on
        await sup.evict("t")
    finally:
        await sup.aclose()
    # The warden's pids directory, and every worker's leaf in it, are gone.
    base = report[report.index("(/") + 1 : report.index(")")]
    assert base.startswith("/sys/fs/cgroup/"), report
    assert not await asyncio.to_thread(os.path.exists, base), report


def test_the_probe_counts_a_workers_cgroup_only_when_it_is_larger(tmp_path: Any) -> None:
    """Pure: the sample's figure for a root with a cgroup is max(tree RSS, working set);
    a gone root stays gone; an unreadable cgroup leaves the tree figure."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.current").write_text("500\n")
    (v2 / "memory.stat").write_text("anon 300\nfile 200\ninactive_file 150\n")
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.usage_in_bytes").write_text("9000\n")
    (v1 / "memory.stat").write_text("cache 100\ninactive_file 7\ntotal_inactive_file 1000\n")
    assert cgroup_working_set(str(v2)) == 350
    assert cgroup_working_set(str(v1)) == 8000
    assert cgroup_working_set(str(tmp_path / "gone")) is None
    sample = MemorySample({1: 100, 2: 10_000, 3: 100}, 5, 10)
    cgroups = {1: str(v2), 2: str(v1), 3: str(tmp_path / "gone"), 4: str(v2)}
    assert ProcTreeProbe().with_cgroups(sample, cgroups) == MemorySample(
        {1: 350, 2: 10_000, 3: 100}, 5, 10
    )
