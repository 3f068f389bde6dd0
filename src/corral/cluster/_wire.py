"""What the front ends, the directory and the node agents send each other.

Covers: the actors' names, the replies' shapes, the cluster-wide snapshots
(:class:`NodeWorkerInfo`, :class:`NodeStats`, :class:`ClusterStats`,
:class:`NodeWorkerEvent`), and how a corral error crosses an actor boundary
(:func:`error_to_wire` / :func:`error_from_wire`). Not here: who decides what
(:mod:`corral.cluster._directory`, :mod:`corral.cluster._agent`,
:mod:`corral.cluster._front`).

Ray carries these between corral's own trusted processes (front ends and actors
started from the same code), pickled as Ray does. A tenant's worker never
speaks Ray: what it sends is decoded by the local Supervisor as always.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from corral import errors
from corral.supervisor import (
    LayerStatus,
    SupervisorStats,
    TenantBackoff,
    WorkerEvent,
    WorkerInfo,
    WorkerReady,
    WorkerStarting,
    WorkerStopped,
)

__all__ = [
    "DIRECTORY_NAME",
    "ClusterStats",
    "NodeStats",
    "NodeTenantBackoff",
    "NodeWorkerEvent",
    "NodeWorkerInfo",
    "NodeWorkerReady",
    "NodeWorkerStarting",
    "NodeWorkerStopped",
    "Reply",
    "agent_name",
    "error_from_wire",
    "error_to_wire",
    "on_node",
]

DIRECTORY_NAME = "corral-directory"


def agent_name(node_id: str) -> str:
    """The name of corral's agent on the Ray node ``node_id`` (in corral's namespace)."""
    return f"corral-agent-{node_id}"


class Reply(enum.IntEnum):
    """The first item of an agent's answer to a call: ``(Reply.OK, value)``,
    ``(Reply.ERROR, wire_error)`` or ``(Reply.STALE, why)``."""

    OK = 0
    ERROR = 1  # a corral error from the local Supervisor (the kernel's included)
    STALE = 2  # refused before any worker saw it: the tenant is not placed here at that epoch


class NodeWorkerInfo(WorkerInfo, frozen=True):
    """:class:`~corral.WorkerInfo` with the Ray node the worker runs on."""

    node: str = ""  # Ray node id (hex)
    node_address: str = ""  # the node's IP address


class NodeWorkerStarting(WorkerStarting, frozen=True, tag="starting"):
    """:class:`~corral.WorkerStarting` on a Ray node."""

    node: str = ""  # Ray node id (hex)
    node_address: str = ""


class NodeWorkerReady(WorkerReady, frozen=True, tag="ready"):
    """:class:`~corral.WorkerReady` on a Ray node."""

    node: str = ""
    node_address: str = ""


class NodeWorkerStopped(WorkerStopped, frozen=True, tag="stopped"):
    """:class:`~corral.WorkerStopped` on a Ray node."""

    node: str = ""
    node_address: str = ""


class NodeTenantBackoff(TenantBackoff, frozen=True, tag="backoff"):
    """:class:`~corral.TenantBackoff` on a Ray node."""

    node: str = ""
    node_address: str = ""


NodeWorkerEvent = NodeWorkerStarting | NodeWorkerReady | NodeWorkerStopped | NodeTenantBackoff
"""A :data:`~corral.WorkerEvent` with the Ray node it happened on (``node``,
``node_address``): each kind's class, with the same ``kind`` tag."""

_ON_NODE: dict[type[WorkerEvent], type[NodeWorkerEvent]] = {
    WorkerStarting: NodeWorkerStarting,
    WorkerReady: NodeWorkerReady,
    WorkerStopped: NodeWorkerStopped,
    TenantBackoff: NodeTenantBackoff,
}


def on_node(event: WorkerEvent, node: str, address: str) -> NodeWorkerEvent:
    """``event`` as it happened on ``node`` (at ``address``)."""
    fields = msgspec.structs.asdict(event)
    return _ON_NODE[type(event)](**fields, node=node, node_address=address)


class NodeStats(msgspec.Struct, frozen=True):
    """One node as the directory sees it (``ClusterStats.nodes``)."""

    node: str  # Ray node id (hex)
    address: str  # IP address
    state: str  # "starting", "up", "failed" (the agent could not start: see error), "lost"
    placed: int  # tenants placed on it by the directory
    workers: int  # live workers its agent reported last
    max_workers: int
    memory_pressure: str | None  # what the pressure is, while it lasts
    error: str | None = None


class ClusterStats(SupervisorStats, frozen=True):
    """:class:`~corral.SupervisorStats` summed over the cluster's nodes.

    ``workers`` are :class:`NodeWorkerInfo` (each with its node), least recently used
    first on each node, nodes one after another; ``max_workers``, ``starts``, ``stops``
    and ``tenants_in_backoff`` are sums; ``memory_pressure`` names the nodes under
    pressure; ``sandbox`` and ``memory_enforcement`` are the first node's, and each
    node's are in ``node_sandbox``. ``nodes`` is every node the directory knows.
    """

    nodes: list[NodeStats] = []
    node_sandbox: dict[str, dict[str, LayerStatus]] = {}
    placements: int = 0  # tenants placed cluster-wide


# -- errors across an actor boundary ---------------------------------------------------------

# Only corral's own error classes are rebuilt by name; anything else arrives as a
# CorralError with its text (nothing is mapped to an arbitrary class).
_ERRORS: dict[str, type[errors.CorralError]] = {
    name: cls
    for name in dir(errors)
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, errors.CorralError)
}


def error_to_wire(exc: errors.CorralError) -> tuple[str, str, dict[str, Any]]:
    """``(class name, message, attributes)`` of a corral error, for another process."""
    return type(exc).__name__, str(exc), dict(vars(exc))


def error_from_wire(wire: tuple[str, str, dict[str, Any]]) -> errors.CorralError:
    """The corral error :func:`error_to_wire` described, rebuilt (same class, message
    and attributes) without calling its ``__init__``."""
    name, message, attributes = wire
    cls = _ERRORS.get(name, errors.CorralError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(attributes)
    return exc
