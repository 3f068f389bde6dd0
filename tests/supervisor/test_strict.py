"""``Sandbox.strict()``: the root-only layers, seen from inside a worker and from the host.

A worker under strict runs as a uid of its own, as pid 2 of its own PID namespace
under corral's init, with private mount/network/IPC/UTS namespaces, a private /proc and
/dev/shm, and a pids cgroup. These tests need root and an interpreter other uids can
read; elsewhere they skip with corral's reason (``CORRAL_REQUIRE_STRICT=1`` makes that
a failure, as in CI). The hostile-kernel suite runs under strict too
(``test_hostile.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import psutil
import pytest
import pytest_asyncio

import corral
from corral import Sandbox, Supervisor
from corral.supervisor._memory import ProcTreeProbe
from corral.worker._privileged import default_lock_dir
from tests.helpers import FAST, REQUIRE_STRICT, K, run_host, start_strict, wait_pids_exit

LOCK_DIR = default_lock_dir()

pytestmark = pytest.mark.timeout(120)


def strict(**changes: Any) -> Sandbox:
    return msgspec.structs.replace(Sandbox.strict(), **changes)


@contextlib.asynccontextmanager
async def strict_supervisor(factory: str, **options: Any) -> AsyncIterator[Supervisor]:
    """``async with Supervisor(...)``, but skipped (or failed in CI) where strict is
    unavailable: see ``start_strict``."""
    sup = Supervisor(factory, **options)
    try:
        yield await start_strict(sup)
    finally:
        await sup.aclose()


@pytest_asyncio.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with strict_supervisor(K, sandbox=strict(), **FAST) as supervisor:
        yield supervisor


def worker_pid(sup: Supervisor, tenant: str) -> int:
    (info,) = [w for w in sup.stats().workers if w.tenant == tenant]
    assert info.pid is not None
    return info.pid


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant, as the host sees them."""
    proc = psutil.Process(pid)
    return [pid, *(p.pid for p in proc.children(recursive=True))]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_each_worker_has_its_own_uid_pid_namespace_and_nothing_else_in_view(
    start_method: Literal["forkserver", "spawn"],
) -> None:
    sandbox = strict(max_processes=64)
    async with strict_supervisor(K, sandbox=sandbox, start_method=start_method, **FAST) as sup:
        a = await sup.call("a", "identity")
        b = await sup.call("b", "identity")
        report = sup.stats().sandbox
    first, count = sandbox.uid_range
    for me in (a, b):
        assert first <= me["uid"] < first + count and me["gid"] == me["uid"], me
        assert me["groups"] == []
        assert (me["pid"], me["ppid"]) == (2, 1)  # under corral's init
        assert me["visible"] == [1, 2]  # a private /proc: nothing of the host's
        assert me["hostname"] == "corral"
        assert me["interfaces"] == ["lo"]  # no way out
        assert me["nproc"] == [64, 64]  # RLIMIT_NPROC counts this uid only
    assert a["uid"] != b["uid"]
    assert all(status.on for status in report.values()), report


async def test_exit_statuses_come_through_the_init(sup: Supervisor) -> None:
    with pytest.raises(corral.WorkerCrashedError) as exited:
        await sup.call("a", "crash", 3)
    assert (exited.value.exitcode, exited.value.signal) == (3, None)
    with pytest.raises(corral.WorkerCrashedError) as killed:
        await sup.call("b", "kill_self", signal.SIGKILL)
    assert (killed.value.exitcode, killed.value.signal) == (None, signal.SIGKILL)
    assert await sup.call("a", "echo", "again") == "again"


async def test_dev_shm_is_private_bounded_and_goes_with_the_worker() -> None:
    name = f"corral-test-{uuid.uuid4().hex}"
    async with strict_supervisor(K, sandbox=strict(shm_bytes=1 << 20), **FAST) as sup:
        filled = await sup.call("a", "fill_shm", name, 4 << 20)
        assert filled["errno"] == errno.ENOSPC and filled["written"] <= 1 << 20, filled
        assert not await asyncio.to_thread(os.path.exists, f"/dev/shm/{name}")  # not the host's
        other = await sup.call("b", "fill_shm", name, 1024)  # b has its own, empty one
        assert other == {"written": 1024, "errno": None}
        await sup.evict("a")
        with pytest.raises(corral.KernelError) as gone:  # a's next worker: a fresh /dev/shm
            await sup.call("a", "read_file", f"/dev/shm/{name}")
    assert gone.value.remote_type == "builtins.FileNotFoundError"


async def test_the_namespace_alone_kills_a_setsid_daemon_with_the_worker() -> None:
    async with strict_supervisor(K, sandbox=strict(cgroup_tree=False), **FAST) as sup:
        await sup.call("t", "start_child", True)  # a child in a session of its own
        pids = tree(worker_pid(sup, "t"))
        assert len(pids) == 3  # init, worker, daemon
        await sup.evict("t")
        assert wait_pids_exit(pids, timeout=30.0) == []


async def test_a_killed_warden_takes_every_namespace_with_it() -> None:
    """Without namespaces (and without a tree cgroup) a setsid'd grandchild outlives a
    SIGKILLed warden; a namespace's init dies with the warden, and the kernel kills the
    rest of its namespace."""
    async with strict_supervisor(K, sandbox=strict(cgroup_tree=False), **FAST) as sup:
        await sup.call("t", "start_child", True)
        pids = tree(worker_pid(sup, "t"))
        warden = sup._launcher.warden_pid  # type: ignore[attr-defined]
        assert warden is not None
        os.kill(warden, signal.SIGKILL)
        assert wait_pids_exit(pids, timeout=30.0) == []


async def test_a_uid_is_held_while_its_worker_lives_and_freed_after(sup: Supervisor) -> None:
    uid = (await sup.call("t", "identity"))["uid"]
    lock = os.open(os.path.join(LOCK_DIR, str(uid)), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        await sup.evict("t")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)


async def test_memory_is_the_workers_tree_not_its_init() -> None:
    """The pid corral knows is the init's (a copy of the warden); the worker's memory is
    what is below it."""
    options: dict[str, Any] = {**FAST, "worker_memory_limit": 1 << 30}
    async with strict_supervisor(K, sandbox=strict(), memory_check_interval=0.05, **options) as sup:
        await sup.call("t", "hog", 64)
        init = worker_pid(sup, "t")
        async with asyncio.timeout(30):
            while (sup.stats().workers[0].rss or 0) < 64 << 20:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # ok-sleep: the sampler's next round, with a deadline
        reported = sup.stats().workers[0].rss
        probe = ProcTreeProbe()
        below = (await asyncio.to_thread(probe.sample, [init], True)).trees[init]
        whole = (await asyncio.to_thread(probe.sample, [init])).trees[init]
    assert reported is not None
    assert whole - below > 8 << 20  # the init weighs something
    assert abs(reported - below) < abs(reported - whole), (reported, below, whole)


NON_ROOT_HOST = """
import asyncio, json
import corral

async def main():
    sandbox = corral.Sandbox(namespaces=True)  # required: no best effort
    async with corral.Supervisor("tests.kernels:make", sandbox=sandbox) as sup:
        me = await sup.call("t", "identity")
        report = {layer: str(status) for layer, status in sup.stats().sandbox.items()}
        print(json.dumps({"report": report, "me": me}))

asyncio.run(main())
"""


async def test_without_root_namespaces_come_from_a_user_namespace() -> None:
    """A host that is not root: the warden makes a user namespace of its own and the
    worker still gets its PID, mount and network namespaces."""
    nobody = 65534
    if not await asyncio.to_thread(_readable_by, nobody, sys.executable):
        if REQUIRE_STRICT:
            pytest.fail(f"{sys.executable} must be readable by other users")
        pytest.skip(f"{sys.executable} is not readable by uid {nobody}")
    out, code = await asyncio.to_thread(run_host, NON_ROOT_HOST, 20.0, nobody)
    assert code == 0, out
    result = json.loads(out)
    assert result["report"]["namespaces"].startswith("on ("), result
    assert "user namespace" in result["report"]["namespaces"]
    me = result["me"]
    assert (me["pid"], me["ppid"], me["visible"], me["interfaces"]) == (2, 1, [1, 2], ["lo"])
    assert me["uid"] == 0  # root inside its user namespace only: the host's uid 65534


def _readable_by(uid: int, path: str) -> bool:
    pid = os.fork()
    if pid == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os._exit(0 if os.access(os.path.realpath(path), os.R_OK | os.X_OK) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_every_layer_is_in_place_before_the_kernel_module_is_imported(
    start_method: Literal["forkserver", "spawn"],
) -> None:
    async with strict_supervisor(
        "tests.import_facts:make", sandbox=strict(), start_method=start_method, **FAST
    ) as sup:
        facts = await sup.call("t", "at_import")
    assert facts["uid"] >= Sandbox.strict().uid_range[0]
    assert facts["pid"] == 2
    assert (facts["no_new_privs"], facts["seccomp"]) == ("1", "2")  # seccomp: filter mode
    assert os.path.basename(facts["cwd"]).startswith("corral-scratch-")
