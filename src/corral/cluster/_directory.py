"""The directory: which node serves each tenant, and under which epoch.

Covers: activating a tenant on one node at a time (tenant -> (node, epoch)), choosing
that node (free slots, no memory pressure: power of two choices over the agents'
reports), releasing a placement when the agent says the tenant has no worker left
there or when the node (or its agent) is lost, starting an agent on every alive node
and on nodes that join, the front ends' view of the placements and events, and
shutting corral's actors down when the last front end detaches. Not here: running
workers (:mod:`corral.cluster._agent`), calls (:mod:`corral.cluster._front`).

The invariant it keeps with the agents: a tenant has at most one placement, and a
placement is replaced only after its node's agent released it (and so has no worker
and no call for it) or after that node or agent is known dead. Epochs come from one
counter, so an epoch names one placement for good: an agent that released epoch 7 of
a tenant refuses epoch 7 forever, whatever a front end's cache says.

One async actor, named and detached in corral's namespace, on the head node (the
``node:__internal_head__`` resource): it survives the loss of any worker node. Its
state is in memory: if the head node dies, the Ray cluster (its GCS) goes with it.
Every method's decision is made without an ``await`` in the middle, so decisions
are atomic with respect to each other.

Long because placement, epochs, releases, node loss, events and the summed stats are
one actor's state, and each decision must see all of it at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from corral.errors import StartError
from corral.supervisor import Factory, LayerStatus

from ._agent import NodeAgent
from ._wire import ClusterStats, NodeStats, NodeWorkerEvent, agent_name, error_to_wire

__all__ = ["Directory"]

log = logging.getLogger("corral.cluster")

_CHANGES_KEPT = 8192  # placement changes kept for the front ends' deltas
_EVENTS_KEPT = 4096  # lifecycle events kept for the front ends
_FRONT_END_TIMEOUT = 60.0  # a front end not heard from for this long no longer counts
_PING_EVERY = 4  # monitor rounds between pings of every agent
_PING_TIMEOUT = 2.0
_CHECK_TIMEOUT = 60.0  # seconds a suspect node may stay unconfirmed (alive or dead)


class _Node:
    """One Ray node as the directory sees it."""

    def __init__(self, node_id: str, address: str) -> None:
        self.id = node_id
        self.address = address
        self.state = "starting"  # "starting" -> "up" | "failed"; "lost" for good
        self.handle: Any = None
        self.error: tuple[str, str, dict[str, Any]] | None = None
        self.placed: set[str] = set()  # tenants placed here
        self.workers = 0  # live workers, as last reported
        self.max_workers = 0
        self.pressure: str | None = None  # the agent's memory pressure, while it lasts
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.checking: asyncio.Task[None] | None = None  # a suspicion being checked

    def stats(self) -> NodeStats:
        return NodeStats(
            node=self.id,
            address=self.address,
            state=self.state,
            placed=len(self.placed),
            workers=self.workers,
            max_workers=self.max_workers,
            memory_pressure=self.pressure,
            error=self.error[1] if self.error else None,
        )


class Directory:
    """tenant -> (node, epoch) for one corral deployment (one namespace).

    Args:
        namespace: the Ray namespace of this deployment's actors.
        monitor_interval: seconds between looks at the cluster's membership.
    """

    def __init__(self, namespace: str, monitor_interval: float = 0.5) -> None:
        self._namespace = namespace
        self._interval = monitor_interval
        self._state = "new"  # "new" -> "running" -> "closing" -> "closed"
        self._fingerprint: str | None = None
        self._factory: Factory | None = None
        self._options: Mapping[str, Any] = {}
        self._report_interval = 0.25
        self._front_ends: dict[str, float] = {}  # front end id -> monotonic time last heard
        self._nodes: dict[str, _Node] = {}
        self._placements: dict[str, tuple[str, int]] = {}  # tenant -> (node, epoch)
        self._epoch = 0
        self._version = 0  # bumped by every placement change
        self._changes: collections.deque[tuple[int, str, str | None]] = collections.deque(
            maxlen=_CHANGES_KEPT
        )
        self._event_seq = 0
        self._events: collections.deque[tuple[int, NodeWorkerEvent]] = collections.deque(
            maxlen=_EVENTS_KEPT
        )
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._first_sync: asyncio.Task[None] | None = None

    # -- front ends -------------------------------------------------------------------------

    async def attach(
        self,
        front_end: str,
        factory: Factory,
        options: Mapping[str, Any],
        fingerprint: str,
        report_interval: float,
    ) -> tuple[Any, ...]:
        """Register a front end; the first one configures the deployment and starts an
        agent on every alive node.

        Returns:
            ``("ok", version, event_seq)`` (where the front end's view starts);
            ``("closing",)`` (the last front end is shutting it down: try
            again once this actor is gone); ``("mismatch", fingerprint)`` (another
            factory or other options already run here); ``("failed", node, address,
            wire error)`` (an agent could not start its Supervisor).
        """
        if self._state in ("closing", "closed"):
            return ("closing",)
        if self._fingerprint is None:
            self._fingerprint = fingerprint
            self._factory, self._options = factory, dict(options)
            self._report_interval = report_interval
            self._state = "running"
            self._first_sync = self._spawn(self._sync_nodes())
            self._spawn(self._monitor())
        elif fingerprint != self._fingerprint:
            return ("mismatch", self._fingerprint)
        self._front_ends[front_end] = time.monotonic()
        assert self._first_sync is not None
        await asyncio.shield(self._first_sync)
        for node in self._nodes.values():
            if node.state == "failed" and node.error is not None:
                return ("failed", node.id, node.address, node.error)
        return ("ok", self._version, self._event_seq)

    async def detach(self, front_end: str, keep_running: bool = False) -> bool:
        """Unregister a front end. The last one out stops every agent (each stops its
        workers and warden) and returns True: the caller then kills this actor; unless it
        asks to ``keep_running``: then the deployment waits, as it is, for the next. A front
        end that never attached (it was refused: other options) stops nothing."""
        attached = self._front_ends.pop(front_end, None) is not None
        if not attached or self._front_ends or keep_running or self._state != "running":
            return self._state == "closed"
        self._state = "closing"
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        agents = [n.handle for n in self._nodes.values() if n.handle is not None]
        results = await asyncio.gather(
            *(h.shutdown.remote() for h in agents), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, RayActorError):
                log.warning("a corral agent failed to shut down: %s", result)
        for handle in agents:
            await asyncio.to_thread(ray.kill, handle, no_restart=True)
        self._state = "closed"
        self._changed.set()
        return True

    async def watch(
        self,
        front_end: str,
        since_version: int,
        since_event: int,
        want_events: bool,
        timeout: float,
    ) -> tuple[Any, ...]:
        """Wait up to ``timeout`` for a placement change (or an event, if wanted) after
        the given positions, then say what changed.

        Returns:
            ``(version, full, delta, event_seq, events, lost_events)``: ``full`` is every
            ``(tenant, node)`` when the front end is too far behind for a delta (else
            None); ``delta`` is ``[(version, tenant, node or None)]``.
        """
        if front_end in self._front_ends:
            self._front_ends[front_end] = time.monotonic()
        if since_version == self._version and (not want_events or since_event == self._event_seq):
            self._changed.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
        full: list[tuple[str, str]] | None = None
        delta: list[tuple[int, str, str | None]] = []
        oldest = self._changes[0][0] if self._changes else self._version + 1
        if since_version > self._version or (
            since_version < self._version and oldest > since_version + 1
        ):
            full = [(tenant, node) for tenant, (node, _epoch) in self._placements.items()]
        else:
            delta = [c for c in self._changes if c[0] > since_version]
        events: list[NodeWorkerEvent] = []
        lost = 0
        if want_events and since_event < self._event_seq:
            first = self._events[0][0] if self._events else self._event_seq + 1
            lost = max(0, first - since_event - 1)
            events = [e for seq, e in self._events if seq > since_event]
        return self._version, full, delta, self._event_seq, events, lost

    # -- placement ---------------------------------------------------------------------------

    async def place(self, tenant: str) -> tuple[Any, ...]:
        """Where ``tenant`` runs, placing it if it has no placement.

        Returns:
            ``("ok", node, address, epoch, agent handle, version)``, or ``("error",
            kind, message)`` with kind ``"pressure"`` (every node is under memory
            pressure), ``"no_nodes"`` or ``"unconfirmed"`` (its node is suspected lost
            and not yet confirmed either way).
        """
        while True:
            if self._state != "running":
                return ("error", "closed", "corral's cluster directory is shutting down")
            placed = self._placements.get(tenant)
            if placed is not None:
                node = self._nodes[placed[0]]
                if node.checking is not None:
                    # Its node may be dead: wait for the answer rather than place it twice.
                    await asyncio.shield(node.checking)
                    if node.checking is not None:
                        continue
                    if node.state == "lost" or self._placements.get(tenant) != placed:
                        continue
                return ("ok", node.id, node.address, placed[1], node.handle, self._version)
            node_or_error = self._choose()
            if isinstance(node_or_error, tuple):
                return ("error", *node_or_error)
            node = node_or_error
            self._epoch += 1
            self._placements[tenant] = (node.id, self._epoch)
            node.placed.add(tenant)
            self._record(tenant, node.id)
            return ("ok", node.id, node.address, self._epoch, node.handle, self._version)

    def _choose(self) -> _Node | tuple[str, str]:
        """A node for a new tenant: of two random nodes with free slots and no memory
        pressure, the one with fewer tenants (power of two choices: close to the least
        loaded without every front end herding onto the same node). With no free slot
        anywhere, any node without pressure (its Supervisor makes room by LRU)."""
        up = [n for n in self._nodes.values() if n.state == "up" and n.checking is None]
        if not up:
            return ("no_nodes", "no corral agent is up on any node of the Ray cluster")
        calm = [n for n in up if n.pressure is None]
        if not calm:
            detail = "; ".join(f"node {n.address} ({n.id[:8]}): {n.pressure}" for n in up)
            return ("pressure", f"every node is under memory pressure: {detail}")
        roomy = [n for n in calm if len(n.placed) < n.max_workers] or calm
        if len(roomy) == 1:
            return roomy[0]
        a, b = random.sample(roomy, 2)
        return a if len(a.placed) <= len(b.placed) else b

    def ping(self) -> str:
        return self._namespace

    def confirm(self, tenant: str, node: str, epoch: int) -> bool:
        """Is ``tenant`` placed on ``node`` at ``epoch``? (An agent asks before it takes
        a lease.)"""
        return self._placements.get(tenant) == (node, epoch)

    def where(self, tenant: str) -> tuple[str, str, int, Any] | None:
        """``(node, address, epoch, agent)`` of the tenant's placement, or None."""
        placed = self._placements.get(tenant)
        if placed is None:
            return None
        node = self._nodes[placed[0]]
        return node.id, node.address, placed[1], node.handle

    def agents(self) -> list[tuple[str, str, str, Any]]:
        """``(node, address, state, agent)`` for every node known."""
        return [(n.id, n.address, n.state, n.handle) for n in self._nodes.values()]

    def report(
        self,
        node_id: str,
        load: tuple[int, int, str | None],
        releases: list[tuple[str, int]],
        events: list[NodeWorkerEvent],
    ) -> None:
        """An agent's report: its load, the placements it released, its events."""
        node = self._nodes.get(node_id)
        if node is None or node.state == "lost":
            return
        node.workers, node.max_workers, node.pressure = load
        for tenant, epoch in releases:
            self._release(tenant, node_id, epoch)
        for event in events:
            self._event_seq += 1
            self._events.append((self._event_seq, event))
        if events:
            self._changed.set()

    def _release(self, tenant: str, node_id: str, epoch: int) -> None:
        if self._placements.get(tenant) != (node_id, epoch):
            return  # already released (the node was lost meanwhile)
        del self._placements[tenant]
        self._nodes[node_id].placed.discard(tenant)
        self._record(tenant, None)

    def _record(self, tenant: str, node: str | None) -> None:
        self._version += 1
        self._changes.append((self._version, tenant, node))
        self._changed.set()

    # -- nodes ---------------------------------------------------------------------------------

    async def suspect(self, node_id: str) -> bool:
        """A front end's call to this node's agent failed: check whether the node (or the
        agent) is dead, and release its placements if so. Returns True if it is lost."""
        node = self._nodes.get(node_id)
        if node is None or node.state == "lost":
            return True
        if node.checking is None:
            node.checking = self._spawn(self._check(node))
        await asyncio.shield(node.checking)
        return node.state == "lost"

    async def _check(self, node: _Node) -> None:
        """Until it is settled: dead by Ray's membership, or its agent dead (released),
        or its agent answering (kept)."""
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                while node.state != "lost":
                    alive = await self._alive_nodes()
                    if node.id not in alive:
                        self._lose(node, "the node left the Ray cluster")
                        return
                    try:
                        await asyncio.wait_for(node.handle.ping.remote(), _PING_TIMEOUT)
                        return  # it answers: not lost
                    except ActorDiedError:
                        self._lose(node, "corral's agent on it died")
                        return
                    except (RayActorError, TimeoutError):
                        await asyncio.sleep(self._interval)  # not known yet: look again
        except TimeoutError:
            log.warning("node %s unreachable but not confirmed dead", node.address)
        finally:
            node.checking = None

    def _lose(self, node: _Node, why: str) -> None:
        """The node or its agent is gone, and with it every worker its agent ran: release
        all of its placements (their tenants go elsewhere on their next call)."""
        if node.state == "lost":
            return
        log.warning(
            "node %s (%s) lost: %s; releasing %d placements",
            node.address,
            node.id,
            why,
            len(node.placed),
        )
        node.state = "lost"
        node.error = ("NodeLostError", why, {})
        for tenant in node.placed:
            if self._placements.get(tenant, ("",))[0] == node.id:
                del self._placements[tenant]
                self._record(tenant, None)
        node.placed.clear()
        if not node.ready.done():
            node.ready.set_result(None)

    async def _alive_nodes(self) -> dict[str, str]:
        nodes = await asyncio.to_thread(ray.nodes)
        return {n["NodeID"]: n["NodeManagerAddress"] for n in nodes if n["Alive"]}

    async def _sync_nodes(self) -> None:
        """Start an agent on every alive node that has none (new, or whose agent died), and
        drop the nodes that left. Waits for the agents it starts."""
        alive = await self._alive_nodes()
        for node in list(self._nodes.values()):
            if node.id not in alive:
                self._lose(node, "the node left the Ray cluster")
        starting = []
        for node_id, address in alive.items():
            known = self._nodes.get(node_id)
            if known is None or (known.state == "lost" and known.checking is None):
                node = self._nodes[node_id] = _Node(node_id, address)
                starting.append(self._start_agent(node))
        await asyncio.gather(*starting)

    async def _start_agent(self, node: _Node) -> None:
        assert self._factory is not None
        me = ray.get_runtime_context().current_actor
        actor = ray.remote(NodeAgent).options(
            name=agent_name(node.id),
            namespace=self._namespace,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
            num_cpus=0,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=10_000,
        )
        try:
            node.handle = await asyncio.to_thread(
                actor.remote,
                node.id,
                node.address,
                me,
                self._factory,
                self._options,
                self._report_interval,
            )
            state, error = await node.handle.start.remote()
        except RayActorError as exc:  # the node went away while its agent started
            self._lose(node, f"its agent died while starting: {exc}")
            return
        except Exception as exc:
            state, error = "failed", error_to_wire(StartError(str(exc), tenant="", pid=None))
        if node.state == "lost":
            return
        if state == "up":
            stats = await node.handle.stats.remote()
            node.max_workers = stats[0].max_workers
            node.state = "up"
        else:
            node.state, node.error = "failed", error
        node.ready.set_result(None)

    async def _monitor(self) -> None:
        """Follow the cluster's membership: agents for joining nodes, releases for lost
        ones, and a ping now and then for agents that died on a live node."""
        assert self._first_sync is not None
        await self._first_sync
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            try:
                await self._sync_nodes()
                if rounds % _PING_EVERY == 0:
                    await self._ping_all()
            except Exception:
                log.exception("corral directory: membership check failed; trying again")
            now = time.monotonic()
            for front_end, seen in list(self._front_ends.items()):
                if now - seen > _FRONT_END_TIMEOUT:
                    del self._front_ends[front_end]

    async def _ping_all(self) -> None:
        up = [n for n in self._nodes.values() if n.state == "up" and n.checking is None]
        results = await asyncio.gather(
            *(asyncio.wait_for(n.handle.ping.remote(), _PING_TIMEOUT) for n in up),
            return_exceptions=True,
        )
        for node, result in zip(up, results, strict=True):
            if isinstance(result, ActorDiedError):
                self._lose(node, "corral's agent on it died")

    # -- stats ---------------------------------------------------------------------------------

    async def cluster_stats(self) -> ClusterStats:
        """Every agent's stats, summed; each worker with its node."""
        up = [n for n in self._nodes.values() if n.state == "up"]
        results = await asyncio.gather(
            *(asyncio.wait_for(n.handle.stats.remote(), 10.0) for n in up),
            return_exceptions=True,
        )
        workers = []
        starts = 0
        stops: collections.Counter[str] = collections.Counter()
        backoff = 0
        pressure = []
        sandboxes: dict[str, dict[str, LayerStatus]] = {}
        enforcement = "none"
        baseline: int | None = None
        for node, result in zip(up, results, strict=True):
            if isinstance(result, BaseException):
                continue
            stats, infos = result
            workers.extend(infos)
            starts += stats.starts
            stops.update(stats.stops)
            backoff += stats.tenants_in_backoff
            if stats.memory_pressure:
                pressure.append(f"node {node.address} ({node.id[:8]}): {stats.memory_pressure}")
            sandboxes[node.id] = stats.sandbox
            if not baseline:
                enforcement, baseline = stats.memory_enforcement, stats.memory_baseline
        first = next(iter(sandboxes.values()), {})
        return ClusterStats(
            state=self._state,
            max_workers=sum(n.max_workers for n in up),
            workers=workers,
            starts=starts,
            stops=dict(stops),
            tenants_in_backoff=backoff,
            memory_enforcement=enforcement,
            memory_baseline=baseline,
            memory_pressure="; ".join(pressure) or None,
            sandbox=first,
            nodes=[n.stats() for n in self._nodes.values()],
            node_sandbox=sandboxes,
            placements=len(self._placements),
        )

    # -- helpers -------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
