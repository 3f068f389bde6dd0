"""The front end: :class:`ClusterSupervisor`, the local Supervisor's API over a Ray cluster.

Covers: connecting to Ray, attaching to (or creating) the deployment's directory,
routing each call to the agent of the node its tenant is placed on (placements
cached, each call carrying its epoch), turning a lost node into one typed error per
call in flight (:class:`~corral.NodeLostError`, never a retry), and keeping a view
of the placements, events and stats for the synchronous parts of the API. Not here:
where tenants go (:mod:`corral.cluster._directory`) or how workers run
(:mod:`corral.cluster._agent`, then the local Supervisor).

Data flow::

    await cs.call(tenant, method, *args)
        frame = msgpack((tenant, method, timeout, args, kwargs))   (InvalidCallError here)
        placement = cache[tenant] or directory.place(tenant)
        agent.call(epoch, frame) ──▶ (OK, value) | (ERROR, corral error)
            (STALE, why): the cache was stale; ask the directory again (the call never ran)
            RayActorError: the node or its agent died: NodeLostError, once; the directory
            is told first, so that the tenant's next call goes elsewhere
    background: directory.watch() long-poll ─▶ placements view (keys, len, in) + events

Long because it is the whole Supervisor API (calls, placement cache, events, stats,
close) over the cluster's actors, with the node-loss handling each method needs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Literal

import msgspec
import ray
from ray.exceptions import RayActorError

from corral.errors import (
    CapacityError,
    InvalidCallError,
    MemoryPressureError,
    NodeLostError,
    ResultTypeError,
    SupervisorClosedError,
)
from corral.supervisor import WorkerEvent
from corral.supervisor._config import Factory, serialise_factory
from corral.supervisor._shared import ResultDecoders, check_method
from corral.supervisor.events import Subscription, read_events
from corral.supervisor.options import SupervisorOptions
from corral.supervisor.tenants import check_tenant

from ._directory import Directory
from ._wire import (
    DIRECTORY_NAME,
    ClusterStats,
    NodeWorkerEvent,
    NodeWorkerInfo,
    Reply,
    error_from_wire,
)

__all__ = ["ClusterSupervisor"]

log = logging.getLogger("corral.cluster")

_encode = msgspec.msgpack.Encoder().encode
_FRAME_OVERHEAD = 64
_WATCH_TIMEOUT = 10.0  # seconds a view long-poll waits at the directory
_STALE_RETRIES = 40  # refusals in a row before giving up (each waits a little longer)
_NOT_CARRIED = ("launcher", "clock", "on_event")  # Supervisor options that stay local


class _Placement(msgspec.Struct, frozen=True):
    node: str
    address: str
    epoch: int
    agent: Any  # the node agent's actor handle


def _fingerprint(factory: Factory, options: Mapping[str, Any]) -> str:
    """What two front ends must agree on to share one deployment's agents."""
    name = factory if isinstance(factory, str) else f"{factory.__module__}.{factory.__qualname__}"
    return repr((name, sorted((k, repr(v)) for k, v in options.items())))


def _typed(value: Any, result_type: Any, tenant: str, method: str) -> Any:
    """A node's reply as ``result_type``, converted strictly."""
    try:
        return msgspec.convert(value, result_type, strict=True)
    except msgspec.ValidationError as exc:
        raise ResultTypeError(
            tenant=tenant, pid=None, method=method, result_type=result_type, detail=str(exc)
        ) from None


class ClusterSupervisor:
    """The :class:`~corral.Supervisor` API over a Ray cluster: one corral agent (a local
    Supervisor) per Ray node, each tenant active on one node at a time.

    Args:
        factory: as for :class:`~corral.Supervisor`; importable on every node (an import
            string, or a callable Ray can carry).
        address: ``"auto"`` (the running cluster), ``"ray://host:port"`` (Ray Client) or
            None (a new local Ray if this process is not connected yet). Ignored if this
            process is already connected to Ray.
        namespace: the Ray namespace of this deployment's actors: front ends with the
            same namespace share the directory and agents (and must pass the same
            factory and options).
        on_event: called on this front end's loop with each cluster event (a
            :class:`NodeWorkerEvent`: a WorkerEvent with its node).
        report_interval: seconds between an agent's load reports to the directory.
        stats_interval: seconds between refreshes of :meth:`stats`' snapshot while it
            is read.
        options: every node's local Supervisor options (a
            :class:`~corral.SupervisorOptions`; ``max_workers`` is per node).
        **supervisor_options: options by name, on top of ``options`` (as for the local
            Supervisor), checked here as the local Supervisor checks them.
    """

    def __init__(
        self,
        factory: Factory,
        options: SupervisorOptions | None = None,
        *,
        address: str | None = "auto",
        namespace: str = "corral",
        on_event: Callable[[WorkerEvent], None] | None = None,
        report_interval: float = 0.25,
        stats_interval: float = 1.0,
        **supervisor_options: Any,
    ) -> None:
        for name in ("launcher", "clock"):
            if name in supervisor_options:
                raise ValueError(f"{name} cannot be carried to the cluster's nodes")
        # Checked now, as the local Supervisor checks them (the agents build theirs later).
        # ``probe`` is code the Supervisor takes beside its options; it is carried as given.
        serialise_factory(factory)
        named = {name: value for name, value in supervisor_options.items() if name != "probe"}
        checked = SupervisorOptions(**named) if options is None else options.with_(**named)
        if options is not None:  # the nodes get every option by name, as given here
            supervisor_options = {**msgspec.structs.asdict(checked), **supervisor_options}
        if not namespace:
            raise ValueError("namespace must be a non-empty str")
        self._factory = factory
        self._options = dict(supervisor_options)
        self._fingerprint = _fingerprint(factory, self._options)
        self._address = address
        self._namespace = namespace
        self._on_event = on_event
        self._report_interval = report_interval
        self._stats_interval = stats_interval
        self._call_timeout = checked.call_timeout
        self._max_frame = checked.max_frame_bytes
        self._id = uuid.uuid4().hex
        self._state = "new"  # "new" -> "running" -> "closing" -> "closed"
        self._owns_ray = False
        self._directory: Any = None
        self._cache: dict[str, _Placement] = {}
        # tenant -> (node, directory version of that fact), oldest placement first
        self._view: dict[str, tuple[str, int]] = {}
        self._version = 0
        self._event_seq = 0
        self._subscriptions: list[Subscription[NodeWorkerEvent]] = []
        self._stats: ClusterStats | None = None
        self._stats_wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._method_names: set[str] = set()
        self._result_decoders = ResultDecoders()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Ray, attach to the deployment's directory (creating it, and an agent on
        every alive node, if this is the first front end) and wait for the agents.

        Raises:
            StartError: an agent's Supervisor could not start (e.g. a sandbox layer that
                node cannot give); the message names the node.
            ValueError: this namespace already runs another factory or other options.
            SupervisorClosedError: closed already.
        """
        if self._state == "running":
            return
        if self._state != "new":
            raise SupervisorClosedError("this supervisor has been closed; create a new one")
        self._state = "starting"
        try:
            await self._connect()
        except BaseException:
            self._state = "new"
            await asyncio.shield(self._abort())
            raise
        self._state = "running"
        self._spawn(self._watch())
        self._spawn(self._refresh_stats())

    async def _connect(self) -> None:
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=self._address)
            self._owns_ray = True
        for _attempt in range(100):
            self._directory = await asyncio.to_thread(self._directory_actor)
            reply = await self._directory.attach.remote(
                self._id, self._factory, self._options, self._fingerprint, self._report_interval
            )
            if reply[0] == "closing":  # the last front end is stopping it: wait, make anew
                await self._wait_gone(self._directory)
                continue
            break
        else:
            raise SupervisorClosedError("corral's directory kept shutting down")
        if reply[0] == "mismatch":
            raise ValueError(
                f"namespace {self._namespace!r} already runs corral with another factory or "
                f"other options ({reply[1]}); use the same ones, or another namespace"
            )
        if reply[0] == "failed":
            _, node, address, wire = reply
            error = error_from_wire(wire)
            error.args = (f"corral's agent on node {address} ({node}) cannot start: {error}",)
            raise error
        self._version, self._event_seq = reply[1], reply[2]

    def _directory_actor(self) -> Any:
        return (
            ray.remote(Directory)
            .options(
                name=DIRECTORY_NAME,
                namespace=self._namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                # On the head node: it survives any worker node.
                resources={"node:__internal_head__": 0.001},
                max_restarts=0,
                max_concurrency=10_000,
            )
            .remote(self._namespace)
        )

    @staticmethod
    async def _wait_gone(actor: Any, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await actor.ping.remote()
                except RayActorError:
                    return
                await asyncio.sleep(0.05)

    async def aclose(self, *, keep_running: bool = False) -> None:
        """Detach from the deployment. The last front end to close stops every agent (each
        drains and stops its workers and warden) and the directory: no corral actor or
        process is left. Disconnects from Ray if :meth:`start` connected.

        Args:
            keep_running: only detach, even as the last front end: the directory, the
                agents and every tenant's worker (with its state) keep running for the
                next front end of this namespace (a gateway restarted in place). A later
                front end's plain ``aclose()`` stops them when it is the last one out.

        **Cancellation:** the close goes on in the background.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            return
        self._state = "closing"
        await asyncio.shield(self._abort(keep_running))

    async def _abort(self, keep_running: bool = False) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._directory is not None:
            try:
                if await self._directory.detach.remote(self._id, keep_running):
                    await asyncio.to_thread(ray.kill, self._directory, no_restart=True)
                    await self._wait_gone(self._directory)
            except RayActorError:
                pass  # the directory is gone already (head node lost)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
        self._state = "closed" if self._state != "new" else "new"
        for subscription in self._subscriptions:
            subscription.close()

    async def __aenter__(self) -> ClusterSupervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self, tenant: str, method: str, /, *args: Any, result_type: Any = None, **kwargs: Any
    ) -> Any:
        """As :meth:`corral.Supervisor.call`, on the node the tenant is placed on. A
        ``result_type`` is checked here, on the reply as the node sent it (strictly, as
        msgspec converts: ResultTypeError if it does not fit).

        Raises:
            NodeLostError: the node (or corral's agent on it) died during the call; the
                call may have run there; it is not retried.
            everything :meth:`corral.Supervisor.call` raises, from that node.
        """
        return await self.invoke(tenant, method, args, kwargs, result_type=result_type)

    async def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
        result_type: Any = None,
    ) -> Any:
        """Like :meth:`call`, with explicit arguments, a per-call ``timeout`` and
        ``result_type``."""
        if result_type is None:
            return await self._invoke(tenant, method, args, kwargs, timeout)
        self._result_decoders.get(result_type)  # refused before the call, as locally
        value = await self._invoke(tenant, method, args, kwargs, timeout)
        return _typed(value, result_type, tenant, method)

    async def _invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: Mapping[str, Any] | None,
        timeout: float | Literal["default"] | None,
    ) -> Any:
        self._check_open()
        check_tenant(tenant)
        if method not in self._method_names:
            check_method(method, self._method_names)
        if timeout != "default" and timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise ValueError(f"timeout must be > 0, got {timeout!r}")
        try:
            # One msgpack frame, one Ray argument: Ray's cost grows with each argument.
            frame = _encode((tenant, method, timeout, args, {} if kwargs is None else kwargs))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidCallError(f"arguments for {method!r} cannot be sent: {exc}") from exc
        if len(frame) + _FRAME_OVERHEAD - len(tenant) - len(method) > self._max_frame:
            raise InvalidCallError(
                f"arguments for {method!r} are {len(frame)} bytes, "
                f"over max_frame_bytes={self._max_frame}"
            )
        return await self._on_agent(tenant, lambda p: p.agent.call.remote(p.epoch, frame))

    async def _on_agent(self, tenant: str, send: Callable[[_Placement], Any]) -> Any:
        """Send to the tenant's agent; on a stale placement, place again and resend (the
        agent refused before anything ran)."""
        placement = self._cache.get(tenant) or await self._place(tenant)
        for attempt in range(_STALE_RETRIES):
            try:
                kind, value = await send(placement)
            except RayActorError as exc:
                raise self._node_lost(tenant, placement, exc) from exc
            if kind is Reply.OK:
                return value
            if kind is Reply.ERROR:
                raise error_from_wire(value)
            # STALE: usually a release on its way to the directory; it lands in ms.
            if self._cache.get(tenant) is placement:
                del self._cache[tenant]
            if attempt:
                await asyncio.sleep(min(0.001 * 2**attempt, 0.2))
            placement = await self._place(tenant)
        raise CapacityError(
            f"tenant {tenant!r}: its placement kept changing under this call "
            f"({_STALE_RETRIES} refusals); try again"
        )

    async def _place(self, tenant: str) -> _Placement:
        self._check_open()
        try:
            reply = await self._directory.place.remote(tenant)
        except RayActorError as exc:
            raise SupervisorClosedError(
                f"corral's directory is gone (head node lost, or shut down): {exc}"
            ) from exc
        if reply[0] == "ok":
            _, node, address, epoch, agent, version = reply
            placement = _Placement(node, address, epoch, agent)
            self._cache[tenant] = placement
            known = self._view.get(tenant)
            if known is None or known[1] < version:
                self._view[tenant] = (node, version)
            return placement
        _, kind, message = reply
        if kind == "pressure":
            raise MemoryPressureError(
                f"no node for {tenant!r}: {message}",
                reason="host_pressure",
                retry_after=max(1.0, 4 * self._report_interval),
            )
        if kind == "closed":
            raise SupervisorClosedError(message)
        raise CapacityError(f"no node for {tenant!r}: {message}")

    def _node_lost(self, tenant: str, placement: _Placement, exc: BaseException) -> NodeLostError:
        """The call's agent died with it. Tell the directory now (before this caller can
        call again: a front end's calls to the directory start in order), forget what is
        cached for that node, and give this caller its one typed error."""
        suspect = self._directory.suspect.remote(placement.node)
        self._spawn(_consume(suspect))
        for key in [t for t, p in self._cache.items() if p.node == placement.node]:
            del self._cache[key]
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return NodeLostError(
            f"node {placement.address} ({placement.node}) was lost while it ran a call for "
            f"tenant {tenant!r} ({first_line}); the call may or may not have run and is not "
            "retried; the tenant's next call starts it on another node",
            tenant=tenant,
            node=placement.node,
            node_address=placement.address,
        )

    async def get_or_create(self, tenant: str) -> NodeWorkerInfo:
        """Start the tenant's worker on its node if it has none, and describe it (with its
        node)."""
        self._check_open()
        check_tenant(tenant)
        info: NodeWorkerInfo = await self._on_agent(
            tenant, lambda p: p.agent.get_or_create.remote(tenant, p.epoch)
        )
        return info

    async def evict(self, tenant: str) -> bool:
        """Stop the tenant's worker wherever it runs; True if there was one. Returns once
        the process is gone (the placement is released then)."""
        self._check_open()
        check_tenant(tenant)
        where = await self._directory.where.remote(tenant)
        self._cache.pop(tenant, None)
        if where is None:
            self._view.pop(tenant, None)
            return False
        node, address, epoch, agent = where
        try:
            evicted: bool = await agent.evict.remote(tenant)
        except RayActorError as exc:  # gone with its node
            self._node_lost(tenant, _Placement(node, address, epoch, agent), exc)
            evicted = False
        self._view.pop(tenant, None)
        return evicted

    async def evict_all(self) -> int:
        """Evict every worker on every node; returns how many there were."""
        self._check_open()
        agents = await self._directory.agents.remote()
        counts = await asyncio.gather(
            *(a.evict_all.remote() for _n, _addr, state, a in agents if state == "up"),
            return_exceptions=True,
        )
        self._cache.clear()
        self._view.clear()
        return sum(c for c in counts if isinstance(c, int))

    # -- introspection -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tenants placed on a node, oldest placement first. This front end's own calls and
        evictions show at once; other front ends' and the nodes' (LRU, TTL) once the
        directory has told this front end (milliseconds)."""
        return list(self._view)

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, tenant: object) -> bool:
        """As ``tenant in Supervisor``: InvalidCallError for a key that breaks the rule."""
        check_tenant(tenant)
        return tenant in self._view

    def stats(self) -> ClusterStats:
        """The last snapshot of every node's stats (refreshed every ``stats_interval``
        while it is read; :meth:`fetch_stats` gets a fresh one)."""
        self._stats_wanted.set()
        if self._stats is None:
            return ClusterStats(
                state=self._state,
                max_workers=0,
                workers=[],
                starts=0,
                stops={},
                tenants_in_backoff=0,
                memory_enforcement="none",
                memory_baseline=None,
                memory_pressure=None,
                sandbox={},
            )
        return self._stats

    async def fetch_stats(self) -> ClusterStats:
        """Every node's stats, now (also what :meth:`stats` returns from now on)."""
        self._check_open()
        stats: ClusterStats = await self._directory.cluster_stats.remote()
        self._stats = stats
        return stats

    async def events(self, *, buffer: int = 1024) -> AsyncIterator[NodeWorkerEvent]:
        """Lifecycle events of every node from now on, each with its node, until this
        front end closes (as :meth:`corral.Supervisor.events`)."""
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer!r}")
        if self._state == "closed":
            return
        async for event in read_events(self._subscriptions, buffer):
            yield event

    # -- background ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "running":
            raise SupervisorClosedError(
                "supervisor is not running (use 'async with ClusterSupervisor(...)' or "
                "await start())"
                if self._state in ("new", "starting")
                else "supervisor is closing or closed"
            )

    async def _watch(self) -> None:
        """Follow the directory's placements and events (a long poll)."""
        while True:
            try:
                version, full, delta, event_seq, events, lost = await self._directory.watch.remote(
                    self._id, self._version, self._event_seq, True, _WATCH_TIMEOUT
                )
            except RayActorError:
                log.warning("corral's directory is gone; placements are no longer followed")
                return
            if full is not None:
                mine = {t: v for t, v in self._view.items() if v[1] > version}
                self._view = {t: (n, version) for t, n in full}
                self._view.update(mine)
            for changed_at, tenant, node in delta:
                known = self._view.get(tenant)
                if known is not None and known[1] >= changed_at:
                    continue
                if node is None:
                    self._view.pop(tenant, None)
                else:
                    self._view[tenant] = (node, changed_at)
                cached = self._cache.get(tenant)
                if cached is not None and cached.node != node:
                    del self._cache[tenant]
            self._version = version
            if lost:
                log.warning("missed %d cluster events (this front end fell behind)", lost)
            self._event_seq = event_seq
            for event in events:
                for subscription in self._subscriptions:
                    subscription.put(event)
                if self._on_event is not None:
                    try:
                        self._on_event(event)
                    except Exception:
                        log.exception("on_event hook raised", extra={"tenant": event.tenant})

    async def _refresh_stats(self) -> None:
        while True:
            await self._stats_wanted.wait()
            self._stats_wanted.clear()
            try:
                self._stats = await self._directory.cluster_stats.remote()
            except RayActorError:
                return
            await asyncio.sleep(self._stats_interval)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _consume(ref: Any) -> None:
    try:
        await ref
    except RayActorError:
        pass
