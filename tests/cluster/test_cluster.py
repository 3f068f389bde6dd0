"""ClusterSupervisor on a real Ray cluster of three nodes on this machine (see conftest.py).

Every test runs its own deployment (a namespace of its own) and closes it; the module
shares one cluster. The node-loss test removes a worker node and adds a new one, so
it runs last.

Single activation is checked from the worker side: each kernel takes an exclusive
``flock`` on a per-tenant file for its whole life (tests/cluster/kernels.py); all nodes
share this machine's file system, so a second live worker for a tenant anywhere in the
cluster cannot take it and says so in every answer. The workers run under
``Sandbox.default()`` with the lock directory in ``extra_read_paths``: Landlock lets
them read (and so ``flock``) those files and nothing else there, and write nowhere
outside their scratch directory; the files are created by the test, world-readable, in
a world-readable directory, since as root each worker may run as a uid of its own.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import inspect
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import psutil
import pytest
import ray

import corral
from corral.cluster import ClusterSupervisor, NodeWorkerEvent, SyncClusterSupervisor
from tests.cluster.conftest import LOOPBACK, RayCluster, corral_processes
from tests.cluster.kernels import GATE, LOCK_DIR_ENV, PressureProbe
from tests.helpers import pid_gone, wait_pid_gone

K = "tests.cluster.kernels:make"
FAST: dict[str, Any] = {"shutdown_timeout": 2.0, "term_timeout": 1.0, "start_timeout": 30.0}


def namespace() -> str:
    return f"corral-test-{uuid.uuid4().hex[:8]}"


class _Point(msgspec.Struct):
    x: int
    y: int


@pytest.fixture
def lock_dir() -> Iterator[str]:
    """A world-readable directory the test owns, for the kernels' lock files."""
    path = tempfile.mkdtemp(prefix="corral-cluster-locks-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def overlap_options(lock_dir: str) -> dict[str, Any]:
    """Options that turn the kernels' overlap detector on (see the module docstring)."""
    return {
        "env": {LOCK_DIR_ENV: lock_dir},
        "sandbox": msgspec.structs.replace(corral.Sandbox.default(), extra_read_paths=(lock_dir,)),
    }


def lock_files(directory: str, tenants: list[str]) -> None:
    for tenant in tenants:
        path = os.path.join(directory, f"{tenant}.lock")
        with open(path, "w"):
            pass
        os.chmod(path, 0o644)


class Gate:
    """The test's side of :meth:`Kernel.hold <tests.cluster.kernels.Kernel.hold>`: holds
    ``<dir>/gate`` exclusively while the ``with`` block runs (the held calls block on it),
    and tells which tenants' calls have entered (their ``<tenant>.entered`` is locked)."""

    def __init__(self, directory: str, tenants: list[str]) -> None:
        self.directory = directory
        self.tenants = tenants
        for name in [GATE, *(f"{t}.entered" for t in tenants)]:
            path = os.path.join(directory, name)
            with open(path, "w"):
                pass
            os.chmod(path, 0o644)  # world-readable: a worker may run as a uid of its own
        self._fd = -1

    def __enter__(self) -> Gate:
        self._fd = os.open(os.path.join(self.directory, GATE), os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self._fd)  # opens the gate (and would if this process died)

    def entered(self, tenant: str) -> bool:
        fd = os.open(os.path.join(self.directory, f"{tenant}.entered"), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its call holds it
        finally:
            os.close(fd)  # (drops the probe's own lock, if it got it)
        return False

    async def all_entered(self, calls: list[asyncio.Future[Any]], timeout: float) -> None:
        """Wait until every tenant's call is in its kernel. Polls: the workers, sandboxed,
        can only take locks here, which offer nothing to wait on. A call that ended
        already (it failed) is raised at once."""
        waiting = set(self.tenants)
        async with asyncio.timeout(timeout):
            while waiting:
                for call in calls:
                    if call.done():
                        call.result()  # raises the failure
                        raise AssertionError(f"a held call returned: {call.result()!r}")
                waiting = {t for t in waiting if not self.entered(t)}
                if waiting:
                    await asyncio.sleep(0.02)  # ok-sleep: a poll (locks offer no wait)


async def eventually(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    """Wait until ``predicate()`` (maybe async) is true. Polls: what it looks at lives in
    other processes (the directory, the agents), which offer nothing to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.02)  # ok-sleep: a poll of other processes' state


async def named_actors_left(namespace: str, timeout: float = 30.0) -> list[Any]:
    """corral's named actors still alive in ``namespace`` (waited for up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [
            a
            for a in await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
            if a["namespace"] == namespace
        ]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)  # ok-sleep: a poll of Ray's actor list, under a deadline


@pytest.fixture
async def front_end() -> AsyncIterator[ClusterSupervisor]:
    async with ClusterSupervisor(K, address=None, namespace=namespace(), **FAST) as cs:
        yield cs


# -- the cluster itself ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_node_and_the_driver_are_on_loopback(ray_cluster: RayCluster) -> None:
    nodes = ray.nodes()
    assert len(nodes) == 3
    assert all(n["Alive"] and n["NodeManagerAddress"] == LOOPBACK for n in nodes), nodes
    assert ray_cluster.cluster.address.startswith(f"{LOOPBACK}:")  # the GCS
    assert ray.util.get_node_ip_address() == LOOPBACK  # the driver


# -- the API -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_same_api_and_errors(ray_cluster: RayCluster, front_end: ClusterSupervisor) -> None:
    cs = front_end
    assert await cs.call("alice", "put", {"page": 1}) == 1
    assert await cs.call("alice", "get") == {"page": 1}
    assert cs.keys() == ["alice"] and len(cs) == 1 and "alice" in cs and "bob" not in cs
    info = await cs.get_or_create("bob")
    assert info.tenant == "bob" and info.state == "ready" and info.node and info.pid
    with pytest.raises(corral.KernelError) as kernel_error:
        await cs.call("alice", "fail", "boom")
    assert kernel_error.value.remote_type == "builtins.ValueError"
    assert kernel_error.value.remote_message == "boom" and kernel_error.value.tenant == "alice"
    with pytest.raises(corral.InvalidCallError) as invalid:
        await cs.call("alice", "_private")
    assert invalid.value.kind == "method"
    with pytest.raises(corral.InvalidCallError):
        await cs.call("alice", "echo", object())
    with pytest.raises(corral.InvalidCallError) as invalid:
        await cs.call("alice", "no_such_method")
    assert invalid.value.kind == "method"
    # typed results: converted strictly on this side; a bad type refused before the call
    assert await cs.call("alice", "echo", {"x": 1, "y": 2}, result_type=_Point) == _Point(1, 2)
    with pytest.raises(corral.ResultTypeError, match=r"\$\.y"):
        await cs.invoke("alice", "echo", ({"x": 1, "y": "2"},), result_type=_Point)
    with pytest.raises(corral.InvalidCallError) as invalid:
        await cs.call("alice", "echo", 1, result_type=3)
    assert invalid.value.kind == "result_type"
    with pytest.raises(corral.CallTimeoutError):
        await cs.invoke("alice", "nap", (5.0,), timeout=0.5)
    assert (await cs.call("alice", "incr"))["calls"] == 1  # a new worker after the timeout kill
    stats = await cs.fetch_stats()
    assert sorted(w.tenant for w in stats.workers) == ["alice", "bob"]
    assert all(w.node_address == LOOPBACK for w in stats.workers)
    assert [n.state for n in stats.nodes] == ["up"] * 3
    assert stats.max_workers == 3 * 32 and stats.sandbox and stats.placements == 2
    assert cs.stats().workers  # the snapshot
    assert await cs.evict("bob") is True
    assert await cs.evict("bob") is False
    assert "bob" not in cs
    assert await cs.evict_all() == 1
    assert len(cs) == 0


@pytest.mark.timeout(120)
async def test_bad_tenant_keys_are_refused_as_the_local_supervisor_refuses_them(
    ray_cluster: RayCluster, front_end: ClusterSupervisor
) -> None:
    cs = front_end
    for bad in ("", "a/b", "bad key", ".hidden", "x" * 129, "line\nbreak", "acme\u0430", 7):
        with pytest.raises(corral.InvalidCallError) as local:
            corral.check_tenant(bad)
        key: Any = bad
        for attempt in (cs.call(key, "echo", 1), cs.get_or_create(key), cs.evict(key)):
            with pytest.raises(corral.InvalidCallError) as remote:
                await attempt
            assert (remote.value.kind, str(remote.value)) == ("tenant", str(local.value))
        with pytest.raises(corral.InvalidCallError) as remote:
            bad in cs  # noqa: B015
        assert str(remote.value) == str(local.value)
    assert cs.keys() == [] and (await cs.fetch_stats()).placements == 0  # nothing was placed


@pytest.mark.timeout(120)
async def test_state_is_kept_across_calls_from_two_front_ends(
    ray_cluster: RayCluster, lock_dir: str
) -> None:
    ns = namespace()
    options = {**overlap_options(lock_dir), **FAST}
    lock_files(lock_dir, ["t1", "t2"])
    seen: list[NodeWorkerEvent] = []
    async with (
        ClusterSupervisor(K, address=None, namespace=ns, **options) as one,
        ClusterSupervisor(K, address=None, namespace=ns, on_event=seen.append, **options) as two,
    ):
        assert await one.call("t1", "put", "from one") == 1
        assert await two.call("t1", "get") == "from one"  # same worker, wherever it runs
        assert await two.call("t1", "put", "from two") == 2
        assert await one.call("t1", "get") == "from two"
        first = await one.call("t1", "whoami")
        assert first == await two.call("t1", "whoami") and not first["overlap"]
        # The other front end's activation shows in this one's view once the directory says.
        await two.call("t2", "put", 1)
        await eventually(lambda: "t2" in one)
        await eventually(lambda: any(e.kind == "ready" and e.tenant == "t2" for e in seen))
        ready = next(e for e in seen if e.kind == "ready" and e.tenant == "t2")
        assert ready.node and ready.node_address == LOOPBACK
        # Another factory in the same namespace is refused, not mixed in.
        with pytest.raises(ValueError, match="another factory or other options"):
            async with ClusterSupervisor("tests.kernels:make", address=None, namespace=ns):
                pass
        # The sync facade, from a thread of the host's.
        sync = SyncClusterSupervisor(K, address=None, namespace=ns, **options)
        await asyncio.to_thread(sync.start)
        try:
            assert await asyncio.to_thread(sync.call, "t1", "get") == "from two"
            assert await asyncio.to_thread(sync.__contains__, "t1")
            assert (await asyncio.to_thread(sync.fetch_stats)).placements == 2
        finally:
            await asyncio.to_thread(sync.close)
    assert await named_actors_left(ns) == []


# -- single activation ---------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_single_activation_under_concurrent_first_calls_from_two_front_ends(
    ray_cluster: RayCluster, lock_dir: str
) -> None:
    """200 tenants, each called for the first time by two front ends at once."""
    tenants = [f"tenant-{i:03d}" for i in range(200)]
    lock_files(lock_dir, tenants)
    ns = namespace()
    options = {**overlap_options(lock_dir), "max_workers": 100, "idle_ttl": None, **FAST}
    async with (
        ClusterSupervisor(K, address=None, namespace=ns, **options) as one,
        ClusterSupervisor(K, address=None, namespace=ns, **options) as two,
    ):
        calls = [fe.call(t, "incr") for t in tenants for fe in (one, two)]
        answers = await asyncio.gather(*calls)
        by_tenant = collections.defaultdict(list)
        for (tenant, _fe), answer in zip(
            ((t, f) for t in tenants for f in (1, 2)), answers, strict=True
        ):
            by_tenant[tenant].append(answer)
        for tenant, (a, b) in by_tenant.items():
            assert not a["overlap"] and not b["overlap"], tenant  # the worker side says so
            assert a["pid"] == b["pid"], tenant  # one worker served both front ends
            assert sorted([a["calls"], b["calls"]]) == [1, 2], tenant
        # And every worker is still alone (a late duplicate would fail its lock now).
        again = await asyncio.gather(*(one.call(t, "whoami") for t in tenants))
        assert not [a for a in again if a["overlap"]]
        stats = await one.fetch_stats()
        assert sorted(w.tenant for w in stats.workers) == tenants  # one worker each
        per_node = collections.Counter(w.node for w in stats.workers)
        print(f"\n200 tenants over the nodes: {sorted(per_node.values())}")
        assert len(per_node) == 3
    assert await named_actors_left(ns) == []


@pytest.mark.timeout(120)
async def test_placement_spreads_over_the_nodes(
    ray_cluster: RayCluster, front_end: ClusterSupervisor
) -> None:
    await asyncio.gather(*(front_end.call(f"s{i}", "echo", i) for i in range(30)))
    stats = await front_end.fetch_stats()
    per_node = collections.Counter(w.node for w in stats.workers)
    assert len(per_node) == 3 and min(per_node.values()) >= 5, per_node
    assert {n.node: n.placed for n in stats.nodes} == dict(per_node)


# -- per-node LRU and TTL ----------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_lru_and_ttl_are_per_node_and_release_the_placement(
    ray_cluster: RayCluster, lock_dir: str
) -> None:
    tenants = [f"lru-{i}" for i in range(8)]
    lock_files(lock_dir, [*tenants, "ttl"])
    events: list[NodeWorkerEvent] = []
    async with ClusterSupervisor(
        K,
        address=None,
        namespace=namespace(),
        max_workers=2,
        idle_ttl=None,
        **overlap_options(lock_dir),
        on_event=events.append,
        **FAST,
    ) as cs:
        for tenant in tenants[:6]:  # 3 nodes x 2 slots: full
            await cs.call(tenant, "incr")
        stats = await cs.fetch_stats()
        assert sorted(n.placed for n in stats.nodes) == [2, 2, 2]
        for tenant in tenants[6:]:  # no free slot anywhere: a node's own LRU makes room
            await cs.call(tenant, "incr")
        await eventually(
            lambda: sum(e.kind == "stopped" and e.reason == "lru" for e in events) == 2
        )
        await eventually(lambda: len(cs) == 6)  # the evicted tenants' placements were released
        stats = await cs.fetch_stats()
        assert all(n.workers <= 2 and n.placed <= 2 for n in stats.nodes), stats.nodes
        evicted = {e.tenant for e in events if e.kind == "stopped" and e.reason == "lru"}
        assert not evicted & set(cs.keys())
        for tenant in evicted:  # come back wherever there is room, still alone
            assert not (await cs.call(tenant, "incr"))["overlap"]

    async with ClusterSupervisor(
        K,
        address=None,
        namespace=namespace(),
        idle_ttl=0.5,
        **overlap_options(lock_dir),
        on_event=events.append,
        **FAST,
    ) as cs:
        await cs.call("ttl", "incr")
        await eventually(
            lambda: any(
                e.kind == "stopped" and e.tenant == "ttl" and e.reason == "idle_ttl" for e in events
            )
        )
        await eventually(lambda: "ttl" not in cs)  # released
        assert (await cs.call("ttl", "incr"))["calls"] == 1  # a fresh activation


# -- memory pressure -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_memory_pressure_on_one_node_sends_new_tenants_elsewhere(
    ray_cluster: RayCluster,
) -> None:
    flags = tempfile.mkdtemp(prefix="corral-cluster-pressure-", dir="/tmp")
    try:
        async with ClusterSupervisor(
            K,
            address=None,
            namespace=namespace(),
            probe=PressureProbe(flags),
            min_available_memory=2**30,
            memory_check_interval=0.1,
            report_interval=0.1,
            **FAST,
        ) as cs:
            squeezed = str(ray_cluster.workers[0].node_id)
            os.close(os.open(os.path.join(flags, squeezed), os.O_CREAT | os.O_WRONLY))

            async def squeezed_seen() -> bool:
                stats = await cs.fetch_stats()
                return any(n.node == squeezed and n.memory_pressure for n in stats.nodes)

            await eventually(squeezed_seen)
            stats = await cs.fetch_stats()
            assert stats.memory_pressure and squeezed[:8] in stats.memory_pressure
            await asyncio.gather(*(cs.call(f"m{i}", "echo", i) for i in range(20)))
            stats = await cs.fetch_stats()
            per_node = collections.Counter(w.node for w in stats.workers)
            assert squeezed not in per_node and len(per_node) == 2, per_node
            os.unlink(os.path.join(flags, squeezed))  # pressure over: it takes tenants again

            async def calm() -> bool:
                return not any(n.memory_pressure for n in (await cs.fetch_stats()).nodes)

            await eventually(calm)
            await asyncio.gather(*(cs.call(f"n{i}", "echo", i) for i in range(20)))
            stats = await cs.fetch_stats()
            assert squeezed in {w.node for w in stats.workers}
    finally:
        shutil.rmtree(flags, ignore_errors=True)


# -- the sandbox -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_an_agent_that_cannot_give_the_sandbox_fails_visibly(
    ray_cluster: RayCluster,
) -> None:
    """strict() with a path a worker's own uid cannot read: dedicated_uid is impossible, so
    each node's Supervisor refuses to start, and so does the front end, with its error."""
    private = tempfile.mkdtemp(prefix="corral-cluster-private-", dir="/tmp")  # mode 0700
    try:
        ns = namespace()
        sandbox = msgspec.structs.replace(corral.Sandbox.strict(), extra_read_paths=(private,))
        cs = ClusterSupervisor(K, address=None, namespace=ns, sandbox=sandbox, **FAST)
        with pytest.raises(corral.StartError) as err:
            await cs.start()
        assert "corral's agent on node 127.0.0.1" in str(err.value)
        assert "dedicated_uid" in str(err.value) or "needs root" in str(err.value)
        with pytest.raises(corral.SupervisorClosedError):
            await cs.call("t", "echo", 1)
        await cs.aclose()
        assert await named_actors_left(ns) == []
    finally:
        shutil.rmtree(private, ignore_errors=True)


# -- closing ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_aclose_leaves_no_actor_and_no_process(ray_cluster: RayCluster) -> None:
    ns = namespace()
    one = ClusterSupervisor(K, address=None, namespace=ns, **FAST)
    two = ClusterSupervisor(K, address=None, namespace=ns, **FAST)
    await one.start()
    await two.start()
    await asyncio.gather(*(one.call(f"c{i}", "echo", i) for i in range(9)))
    agents = await one._directory.agents.remote()
    agent_pids = await asyncio.gather(*(a.pid.remote() for _n, _addr, _s, a in agents))
    workers = [w.pid for w in (await one.fetch_stats()).workers]
    assert len(corral_processes()) >= 9 + 3  # the workers and a warden per node
    await one.aclose()  # not the last: everything keeps running for the other
    assert await two.call("c1", "echo", 1) == 1
    await two.aclose()  # the last: every agent drains its node, then the actors go
    assert await named_actors_left(ns) == []
    # Waited for on pidfds (a TimeoutError names none: the assert below would).
    await asyncio.gather(*(wait_pid_gone(p, 30.0) for p in [*agent_pids, *workers]))
    assert corral_processes() == []
    with pytest.raises(corral.SupervisorClosedError):
        await two.call("c1", "echo", 1)


# -- node loss (last: it changes the cluster) ----------------------------------------------


@pytest.mark.timeout(240)
async def test_node_loss_mid_load(ray_cluster: RayCluster, lock_dir: str) -> None:
    tenants = [f"n{i:02d}" for i in range(30)]
    lock_files(lock_dir, [*tenants, *(f"j{i}" for i in range(30))])
    ns = namespace()
    async with ClusterSupervisor(
        K, address=None, namespace=ns, **overlap_options(lock_dir), **FAST
    ) as cs:
        await asyncio.gather(*(cs.call(t, "incr") for t in tenants))
        doomed = ray_cluster.workers[-1]
        doomed_id = str(doomed.node_id)
        stats = await cs.fetch_stats()
        on_doomed = sorted(w.tenant for w in stats.workers if w.node == doomed_id)
        assert on_doomed, "no tenant on the node to remove"
        agents = await cs._directory.agents.remote()
        agent = next(a for n, _addr, _s, a in agents if n == doomed_id)
        doomed_pids = [
            await agent.pid.remote(),
            *(w.pid for w in stats.workers if w.node == doomed_id),
        ]
        doomed_procs = [psutil.Process(p) for p in doomed_pids]
        doomed_procs += [c for p in doomed_procs[:1] for c in p.children(recursive=True)]

        # Calls in flight everywhere (each one in its kernel, held at the gate), then the
        # node goes, then the gate opens: no call can finish before the node is gone.
        with Gate(lock_dir, tenants) as gate:
            in_flight = [asyncio.ensure_future(cs.invoke(t, "hold", timeout=120)) for t in tenants]
            await gate.all_entered(in_flight, timeout=60)
            await asyncio.to_thread(ray_cluster.remove_node, doomed)
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        lost = {
            t: o for t, o in zip(tenants, outcomes, strict=True) if isinstance(o, BaseException)
        }
        assert sorted(lost) == on_doomed, outcomes  # exactly those calls failed, once each
        for error in lost.values():
            assert isinstance(error, corral.NodeLostError), repr(error)
            assert isinstance(error, corral.WorkerCrashedError)
            assert error.node == doomed_id and error.node_address == LOOPBACK
        for tenant, outcome in zip(tenants, outcomes, strict=True):
            if tenant not in lost:
                assert outcome["calls"] == 2 and not outcome["overlap"]

        # The next call for each affected tenant starts it on another node, once.
        again = await asyncio.gather(*(cs.call(t, "incr") for t in on_doomed))
        assert all(a["calls"] == 1 and not a["overlap"] for a in again), again
        stats = await cs.fetch_stats()
        assert doomed_id not in {w.node for w in stats.workers}
        assert sorted(w.tenant for w in stats.workers) == tenants  # one worker each
        assert not [
            a
            for a in await asyncio.gather(*(cs.call(t, "whoami") for t in tenants))
            if a["overlap"]
        ]
        # No process of that node's corral is left (agent, warden, workers).
        await asyncio.gather(*(wait_pid_gone(p.pid, 30.0) for p in doomed_procs))
        # Exited (a zombie its parent has not reaped yet runs no code) or reaped.
        assert not [p.pid for p in doomed_procs if p.is_running() and not pid_gone(p.pid)]

        # A node that joins gets an agent, and new tenants.
        joined = ray_cluster.add_node()  # (Ray sets signal handlers: main thread only)
        joined_id = str(joined.node_id)

        async def joined_up() -> bool:
            nodes = (await cs.fetch_stats()).nodes
            return any(n.node == joined_id and n.state == "up" for n in nodes)

        await eventually(joined_up, timeout=60)
        await asyncio.gather(*(cs.call(f"j{i}", "echo", i) for i in range(30)))
        assert joined_id in {w.node for w in (await cs.fetch_stats()).workers}
    assert await named_actors_left(ns) == []
