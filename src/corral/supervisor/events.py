"""Lifecycle events: what a supervisor tells ``on_event`` hooks and ``events()`` readers.

:data:`WorkerEvent` is a tagged union of four frozen Structs, told apart by ``kind``
(also the tag when encoded: ``{"kind": "stopped", ...}``): :class:`WorkerStarting`,
:class:`WorkerReady`, :class:`WorkerStopped` and :class:`TenantBackoff`. Match on the
class (``match event: case WorkerStopped(reason=r): ...``) or on ``event.kind``.

Also where one supervisor's events go (:class:`EventHub`: the hook and every reader),
and the one reader's bounded buffer behind ``events()`` (:class:`Subscription`,
:func:`read_events`), shared by the local supervisor and the cluster front end.
Not here: who emits them (:mod:`corral.supervisor._pool`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, Generic, Literal, TypeVar

import msgspec

__all__ = [
    "EventHub",
    "Subscription",
    "TenantBackoff",
    "WorkerEvent",
    "WorkerReady",
    "WorkerStarting",
    "WorkerStopped",
    "read_events",
]


def _now() -> float:
    return time.time()


class WorkerStarting(msgspec.Struct, frozen=True, tag_field="kind", tag="starting"):
    """A worker is being started for ``tenant`` (no pid yet)."""

    kind: ClassVar[Literal["starting"]] = "starting"
    tenant: str
    pid: None = None
    at: float = msgspec.field(default_factory=_now)  # wall-clock time of the event


class WorkerReady(msgspec.Struct, frozen=True, tag_field="kind", tag="ready"):
    """``tenant``'s worker has loaded its kernel and takes calls."""

    kind: ClassVar[Literal["ready"]] = "ready"
    tenant: str
    pid: int | None
    at: float = msgspec.field(default_factory=_now)


class WorkerStopped(msgspec.Struct, frozen=True, tag_field="kind", tag="stopped"):
    """``tenant``'s worker is gone: ``reason`` (a StopReason value: ``"crashed"``,
    ``"timeout"``, ``"memory_limit"``, ``"lru"``, ...), ``rung`` (a Rung value: how far
    corral had to go) and ``returncode`` (waitpid style; None if unknown) say why and how."""

    kind: ClassVar[Literal["stopped"]] = "stopped"
    tenant: str
    pid: int | None
    reason: str
    rung: str
    returncode: int | None
    at: float = msgspec.field(default_factory=_now)


class TenantBackoff(msgspec.Struct, frozen=True, tag_field="kind", tag="backoff"):
    """``tenant`` failed too often: new calls get ``BackoffError`` for ``retry_after``
    seconds; ``reason`` is the last failure's StopReason value."""

    kind: ClassVar[Literal["backoff"]] = "backoff"
    tenant: str
    reason: str
    retry_after: float
    pid: None = None
    at: float = msgspec.field(default_factory=_now)


WorkerEvent = WorkerStarting | WorkerReady | WorkerStopped | TenantBackoff
"""Any lifecycle event (see the module docstring)."""

E = TypeVar("E")

log = logging.getLogger("corral")


class Subscription(Generic[E]):
    """One reader of ``events()``: a bounded buffer that drops the oldest."""

    def __init__(self, buffer: int) -> None:
        self.events: collections.deque[E] = collections.deque(maxlen=buffer)
        self.closed = False
        self.wakeup = asyncio.Event()

    def put(self, event: E) -> None:
        self.events.append(event)  # full: the oldest goes
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


async def read_events(subscriptions: list[Subscription[E]], buffer: int) -> AsyncIterator[E]:
    """Subscribe (into ``subscriptions``, which the owner feeds and closes), yield each
    event as it comes until the subscription is closed, then unsubscribe.

    Raises:
        ValueError: ``buffer`` < 1.
    """
    if buffer < 1:
        raise ValueError(f"buffer must be >= 1, got {buffer!r}")
    subscription: Subscription[E] = Subscription(buffer)
    subscriptions.append(subscription)
    try:
        while True:
            while subscription.events:
                yield subscription.events.popleft()
            if subscription.closed:
                return
            subscription.wakeup.clear()
            await subscription.wakeup.wait()
    finally:
        subscriptions.remove(subscription)


class EventHub:
    """Where one supervisor's events go: its ``on_event`` hook and every ``events()``
    reader. Emitting never raises and never blocks."""

    def __init__(self, hook: Callable[[WorkerEvent], None] | None) -> None:
        self._hook = hook
        self._subscriptions: list[Subscription[WorkerEvent]] = []
        self.closed = False

    def emit(self, event: WorkerEvent) -> None:
        for subscription in self._subscriptions:
            subscription.put(event)
        if self._hook is None:
            return
        try:
            self._hook(event)
        except Exception:
            # The hook is the host's code at a boundary; a broken hook must not break
            # the worker's bookkeeping (this runs inside the handles' callbacks).
            log.exception(
                "on_event hook raised tenant=%s", event.tenant, extra={"tenant": event.tenant}
            )

    async def read(self, buffer: int) -> AsyncIterator[WorkerEvent]:
        """Events from now on until :meth:`close` (see :func:`read_events`)."""
        if self.closed:
            if buffer < 1:
                raise ValueError(f"buffer must be >= 1, got {buffer!r}")
            return
        async for event in read_events(self._subscriptions, buffer):
            yield event

    def close(self) -> None:
        """No more events: every reader ends once it has read what it was given."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()
