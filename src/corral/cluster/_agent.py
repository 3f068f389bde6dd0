"""The node agent: one per Ray node, holding that node's local :class:`~corral.Supervisor`.

Covers: serving calls for the tenants the directory placed on this node, refusing
any other (the epoch check), releasing a placement once the tenant has no worker
here (after an LRU, TTL or memory eviction, a crash, an explicit evict), and
reporting load, memory pressure and lifecycle events to the directory. Not here:
where a tenant goes (:mod:`corral.cluster._directory`), the caller's side
(:mod:`corral.cluster._front`), and anything about running a worker safely: that is
the local Supervisor's, unchanged (warden, sandbox, limits, clean kills).

Data flow::

    front end ── agent.call(epoch, frame: tenant, method, args) ──▶ NodeAgent
        lease[tenant] == epoch ──────────────────────────────▶ Supervisor.invoke ─▶ worker
        no lease: epoch above any released here, and the directory
        confirms (tenant -> this node, epoch) ─▶ lease taken ─▶ Supervisor.invoke
        anything else ─▶ (STALE, why): the front end asks the directory again

    Supervisor "stopped" event / a call ends ─▶ no worker and no call here for the
        tenant ─▶ lease dropped, epoch remembered as released ─▶ directory.release

The agent is an async Ray actor (one event loop, so the checks above and the lease
table need no lock). The class is plain Python; :mod:`corral.cluster._front` and the
directory wrap it with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import msgspec

from corral.errors import CorralError, StartError
from corral.supervisor import Factory, Supervisor, WorkerEvent

from ._wire import NodeWorkerEvent, NodeWorkerInfo, Reply, error_to_wire, on_node

__all__ = ["NodeAgent"]

log = logging.getLogger("corral.cluster")

_decode_frame = msgspec.msgpack.Decoder(
    tuple[str, str, float | Literal["default"] | None, list[Any], dict[str, Any]]
).decode
_EVENT_BATCH = 512  # events sent to the directory at once, at most
_RELEASED_KEEP = 65_536  # released epochs remembered while the directory's ack is awaited


class NodeAgent:
    """corral on one Ray node.

    Args:
        node_id: the Ray node this agent is pinned to.
        node_address: its IP address (for messages and stats).
        directory: the directory's actor handle.
        factory: the kernel factory, as for :class:`~corral.Supervisor`.
        options: the local Supervisor's options (``max_workers``, limits, sandbox, ...).
        report_interval: seconds between load reports to the directory.
    """

    def __init__(
        self,
        node_id: str,
        node_address: str,
        directory: Any,
        factory: Factory,
        options: Mapping[str, Any],
        report_interval: float,
    ) -> None:
        self._node = node_id
        self._address = node_address
        self._directory = directory
        self._report_interval = report_interval
        self._sup = Supervisor(factory, on_event=self._on_event, **options)
        # tenant -> the epoch this node serves it under, e.g. {"alice": 17}
        self._leases: dict[str, int] = {}
        # tenant -> the last epoch released here and not yet acknowledged by the directory;
        # a call carrying it (or an older one) is stale even if the directory has not seen
        # the release yet. Bounded: an entry goes when the directory acknowledges.
        self._released: dict[str, int] = {}
        self._active: Counter[str] = Counter()  # tenant -> calls in this agent right now
        self._events: collections.deque[NodeWorkerEvent] = collections.deque(maxlen=4096)
        self._wake = asyncio.Event()  # an event or a release is waiting to be sent
        self._releases: list[tuple[str, int]] = []
        self._runner: asyncio.Task[None] | None = None
        self._start_error: tuple[str, str, dict[str, Any]] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[str, tuple[str, str, dict[str, Any]] | None]:
        """Start the local Supervisor (its warden; a sandbox the host cannot give fails
        here). Idempotent. Returns ``("up", None)`` or ``("failed", wire error)``."""
        if self._started:
            return ("failed", self._start_error) if self._start_error else ("up", None)
        self._started = True
        try:
            await self._sup.start()
        except (CorralError, ValueError) as exc:
            error = (
                exc if isinstance(exc, CorralError) else StartError(str(exc), tenant="", pid=None)
            )
            self._start_error = error_to_wire(error)
            log.error("corral agent on node %s cannot start: %s", self._node, exc)
            return "failed", self._start_error
        self._runner = asyncio.get_running_loop().create_task(self._report_loop())
        return "up", None

    async def shutdown(self) -> None:
        """Stop every worker on this node and the warden; nothing is served afterwards."""
        self._closed = True
        await self._sup.aclose()
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass

    def ping(self) -> str:
        return self._node

    def pid(self) -> int:
        """This agent's process id (the warden and the workers are its descendants)."""
        return os.getpid()

    def leases(self) -> dict[str, int]:
        """The tenants this node serves and their epochs."""
        return dict(self._leases)

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, epoch: int, frame: bytes) -> tuple[Reply, Any]:
        """Run a call in its tenant's worker here, if the tenant is placed here at
        ``epoch``. ``frame`` is the msgpack of ``(tenant, method, timeout, args, kwargs)``
        (``timeout``: seconds, None, or "default").

        Returns:
            ``(OK, value)``, ``(ERROR, wire error)`` or ``(STALE, why)``.
        """
        tenant, method, timeout, args, kwargs = _decode_frame(frame)
        return await self._leased(
            tenant, epoch, lambda: self._sup.invoke(tenant, method, args, kwargs, timeout=timeout)
        )

    async def get_or_create(self, tenant: str, epoch: int) -> tuple[Reply, Any]:
        """Start ``tenant``'s worker here (if placed here at ``epoch``) and describe it."""
        reply, value = await self._leased(tenant, epoch, lambda: self._sup.get_or_create(tenant))
        return (reply, self._with_node(value)) if reply is Reply.OK else (reply, value)

    async def _leased(
        self, tenant: str, epoch: int, work: Callable[[], Awaitable[Any]]
    ) -> tuple[Reply, Any]:
        """Run ``work()`` for ``tenant`` if it is placed here at ``epoch`` (counted as
        active meanwhile, so its placement is not released under it)."""
        if self._leases.get(tenant) != epoch:
            refused = await self._admit(tenant, epoch)
            if refused is not None:
                return Reply.STALE, refused
        self._active[tenant] += 1
        try:
            value = await work()
        except CorralError as exc:
            return Reply.ERROR, error_to_wire(exc)
        finally:
            self._done(tenant)
        return Reply.OK, value

    async def evict(self, tenant: str) -> bool:
        """Evict ``tenant``'s worker here; True if there was one (returns once it is gone)."""
        return await self._sup.evict(tenant)

    async def evict_all(self) -> int:
        return await self._sup.evict_all()

    def stats(self) -> tuple[Any, list[NodeWorkerInfo]]:
        """The local Supervisor's stats, and its workers with this node's id."""
        stats = self._sup.stats()
        return stats, [self._with_node(info) for info in stats.workers]

    def _with_node(self, info: Any) -> NodeWorkerInfo:
        return NodeWorkerInfo(
            **{f: getattr(info, f) for f in info.__struct_fields__},
            node=self._node,
            node_address=self._address,
        )

    async def _admit(self, tenant: str, epoch: int) -> str | None:
        """Take the lease for ``tenant`` at ``epoch`` if the directory placed it here then.
        Returns None (admitted) or why not."""
        lease = self._leases.get(tenant)
        if lease is not None:
            # Never two epochs at once here: the directory gives a tenant a new epoch only
            # after this node released the old one.
            return f"tenant {tenant!r} is served here at epoch {lease}, not {epoch}"
        released = self._released.get(tenant)
        if released is not None and epoch <= released:
            return f"epoch {epoch} of tenant {tenant!r} was released here"
        if self._closed:
            return "this node's agent is shutting down"
        placed = await self._directory.confirm.remote(tenant, self._node, epoch)
        lease = self._leases.get(tenant)  # another call may have taken it meanwhile
        if lease == epoch:
            return None
        if not placed or lease is not None:
            return f"tenant {tenant!r} is not placed here at epoch {epoch}"
        released = self._released.get(tenant)
        if released is not None and epoch <= released:
            return f"epoch {epoch} of tenant {tenant!r} was released here"
        self._leases[tenant] = epoch
        return None

    def _done(self, tenant: str) -> None:
        active = self._active[tenant] - 1
        if active:
            self._active[tenant] = active
        else:
            del self._active[tenant]
            self._maybe_release(tenant)

    def _maybe_release(self, tenant: str) -> None:
        """Release the placement once the tenant has no worker here (the table entry goes
        only after the process is reaped) and no call here that could start one."""
        if tenant in self._active or tenant in self._sup or tenant not in self._leases:
            return
        epoch = self._leases.pop(tenant)
        self._released[tenant] = epoch
        if len(self._released) > _RELEASED_KEEP:  # the directory is not answering: keep a bound
            self._released.pop(next(iter(self._released)))
        self._releases.append((tenant, epoch))
        self._wake.set()

    def _on_event(self, event: WorkerEvent) -> None:
        self._events.append(on_node(event, self._node, self._address))
        if event.kind == "stopped":
            self._maybe_release(event.tenant)
        self._wake.set()

    # -- reports -------------------------------------------------------------------------------

    async def _report_loop(self) -> None:
        """Send releases and events as they come, and the load every ``report_interval``."""
        loop = asyncio.get_running_loop()
        next_report = 0.0
        while True:
            now = loop.time()
            if now >= next_report:
                next_report = now + self._report_interval
            try:
                async with asyncio.timeout(max(0.0, next_report - now)):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            releases, self._releases = self._releases, []
            events = [self._events.popleft() for _ in range(min(len(self._events), _EVENT_BATCH))]
            if self._events:
                self._wake.set()
            stats = self._sup.stats()
            report = (len(self._sup), stats.max_workers, stats.memory_pressure)
            try:
                await self._directory.report.remote(self._node, report, releases, events)
            except Exception as exc:  # the directory is gone (head lost, or shut down)
                log.warning("corral agent on node %s cannot report: %s", self._node, exc)
                self._releases[:0] = releases  # they must reach the directory: again next time
                continue
            for tenant, epoch in releases:
                if self._released.get(tenant) == epoch:
                    del self._released[tenant]
